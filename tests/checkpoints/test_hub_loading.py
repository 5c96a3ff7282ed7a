"""Hub loading: only the files sbert-flax reads are fetched, all at one commit (a push during the
download cannot mix two snapshots), revision/token/cache_dir reach huggingface_hub, and offline /
auth / not found / disk full each get their own one-line message.

huggingface_hub is patched with a fake hub that serves a tiny model folder from disk and records
every request: no network.
"""

from __future__ import annotations

import errno
import os
import shutil
import types

import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors

from sbert_flax.checkpoints import hub
from sbert_flax.checkpoints.loading import ModelNotFoundError, load_model
from sbert_flax.cli import main as cli

REPO = "owner/tiny-sbert"
# What a real repository often ships beside what sbert-flax reads.
EXTRA_FILES = ["onnx/model.onnx", "tf_model.h5", "openvino/openvino_model.xml",
               "openvino/openvino_model.bin", "pytorch_model.bin", "README.md", "flax_model.msgpack"]


def _response(status: int):
    """A response for huggingface_hub's HTTP errors (its client is httpx2 in 2.x, httpx before)."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/x"))


COMMIT_1, COMMIT_2 = "1" * 40, "2" * 40


class FakeHub:
    """Serves `folder` as repository REPO; records (method, file, revision, token, cache_dir).

    Like the hub, it resolves a branch or tag to the head commit at each request (a commit hash
    names itself) and lays its downloads out as huggingface_hub's cache does
    (`models--owner--name/snapshots/<commit>/<file>`); `push_after` files in, the head moves
    from COMMIT_1 to COMMIT_2.
    """

    def __init__(self, folder: str, extra: list[str], monkeypatch: pytest.MonkeyPatch):
        self.folder, self.calls = folder, []
        self.listing = sorted({os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                               for d, _, fs in os.walk(folder) for f in fs} | set(extra))
        self.fail_list: BaseException | None = None
        self.fail_download: BaseException | None = None
        self.head = COMMIT_1
        self.push_after: int | None = None
        hub_self = self

        def resolve(revision: str | None) -> str:
            return revision if revision in (COMMIT_1, COMMIT_2) else hub_self.head

        def model_info(api, repo_id, *, revision=None, token=None, **kw):
            hub_self.calls.append(("info", repo_id, revision, token, None))
            if hub_self.fail_list is not None:
                raise hub_self.fail_list
            return types.SimpleNamespace(id=repo_id, sha=resolve(revision))

        def list_repo_files(api, repo_id, *, revision=None, repo_type=None, token=None):
            hub_self.calls.append(("list", repo_id, revision, token, None))
            if hub_self.fail_list is not None:
                raise hub_self.fail_list
            return list(hub_self.listing)

        def hf_hub_download(repo_id, filename, *, revision=None, token=None, cache_dir=None, **kw):
            hub_self.calls.append(("get", filename, revision, token, cache_dir))
            if hub_self.fail_download is not None:
                raise hub_self.fail_download
            commit = resolve(revision)
            if hub_self.push_after is not None and len(hub_self.fetched()) > hub_self.push_after:
                hub_self.head = COMMIT_2  # a push lands mid-download
            dest = os.path.join(cache_dir, "models--owner--tiny-sbert", "snapshots", commit,
                                filename)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            src = os.path.join(hub_self.folder, filename)
            if os.path.isfile(src):
                shutil.copyfile(src, dest)
            else:
                with open(dest, "wb") as f:
                    f.write(b"not read")
            return dest

        def snapshot_download(repo_id, *, revision=None, cache_dir=None, token=None,
                              local_files_only=False, **kw):
            hub_self.calls.append(("snapshot", local_files_only, revision, token, cache_dir))
            if hub_self.cached is None:
                raise hf_errors.LocalEntryNotFoundError("not in the cache")
            return hub_self.cached

        self.cached: str | None = None
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    def fetched(self) -> list[str]:
        return [c[1] for c in self.calls if c[0] == "get"]


@pytest.fixture
def st_folder(tiny_bert) -> str:
    return tiny_bert(pooling="mean")


def test_fetches_only_what_is_read(st_folder, tmp_path, monkeypatch):
    fake = FakeHub(st_folder, EXTRA_FILES, monkeypatch)
    cache = str(tmp_path / "cache")
    loaded = load_model(REPO, revision="v1.0", token="hf_secret", cache_dir=cache)
    fetched = fake.fetched()
    assert "model.safetensors" in fetched and "config.json" in fetched
    assert "modules.json" in fetched and "1_Pooling/config.json" in fetched
    for unwanted in EXTRA_FILES:  # pytorch_model.bin too: safetensors is preferred
        assert unwanted not in fetched
    assert len(fetched) == len(set(fetched))
    # The caller's revision is resolved once; every other request names its commit. All carry
    # the caller's token, and the downloads its cache.
    assert fake.calls[0] == ("info", REPO, "v1.0", "hf_secret", None)
    assert {c[2:4] for c in fake.calls[1:]} == {(COMMIT_1, "hf_secret")}
    assert {c[4] for c in fake.calls if c[0] == "get"} == {cache}
    direct = load_model(st_folder)
    assert loaded.pooling == direct.pooling and loaded.config == direct.config
    import jax

    same = jax.tree.map(lambda a, b: bool((a == b).all()), loaded.params, direct.params)
    assert all(jax.tree.leaves(same))


def test_weights_choice_from_listing():
    files = ["config.json", "vocab.txt", "pytorch_model.bin", "tf_model.h5", "onnx/model.onnx"]
    assert hub.files_to_fetch(files, "") == ["config.json", "vocab.txt", "pytorch_model.bin"]
    sharded = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "pytorch_model.bin"]
    assert hub.files_to_fetch(sharded, "") == ["config.json", "model.safetensors.index.json"]
    assert hub.files_to_fetch(["0_BERT/config.json", "0_BERT/model.safetensors"], "0_BERT") == [
        "0_BERT/config.json", "0_BERT/model.safetensors"]


def test_sharded_weights_fetch_their_shards(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors", '
        '"c": "model-1.safetensors"}}')
    fake = FakeHub(str(src), ["model-1.safetensors", "model-2.safetensors", "pytorch_model.bin"],
                   monkeypatch)
    hub.download(REPO, cache_dir=str(tmp_path / "cache"))
    assert sorted(fake.fetched()) == ["config.json", "model-1.safetensors", "model-2.safetensors",
                                      "model.safetensors.index.json"]


def test_offline_uses_the_cache(st_folder, tmp_path, monkeypatch):
    fake = FakeHub(st_folder, [], monkeypatch)
    fake.fail_list = hf_errors.OfflineModeIsEnabled("HF_HUB_OFFLINE=1")
    fake.cached = st_folder
    assert load_model(REPO, cache_dir=str(tmp_path)).config == load_model(st_folder).config
    assert ("snapshot", True, None, None, str(tmp_path)) in fake.calls


OFFLINE, AUTH = "offline: pass a local directory", "needs a token: --token or HF_TOKEN"
NOT_FOUND, DISK_FULL = "not found", "no space left in"


def _failures() -> dict[str, tuple[str, BaseException, str]]:
    """name -> (where it is raised, the error, what the message must say)."""
    return {
        "offline": ("list", ConnectionError("Name or service not known"), OFFLINE),
        "offline-download": ("get", hf_errors.LocalEntryNotFoundError("cannot connect"),
                             OFFLINE),
        "gated": ("list", hf_errors.GatedRepoError("gated", response=_response(403)),
                  AUTH),
        "unauthorized": ("get", hf_errors.HfHubHTTPError("401", response=_response(401)),
                         AUTH),
        "no-repo": ("list", hf_errors.RepositoryNotFoundError("x", response=_response(404)),
                    NOT_FOUND),
        "no-revision": ("list", hf_errors.RevisionNotFoundError("x", response=_response(404)),
                        NOT_FOUND),
        "no-file": ("get", hf_errors.RemoteEntryNotFoundError("x", response=_response(404)),
                    NOT_FOUND),
        "disk-full": ("get", OSError(errno.ENOSPC, "No space left on device"), DISK_FULL),
    }


@pytest.mark.parametrize("name", list(_failures()))
def test_each_failure_has_its_message(name, st_folder, tmp_path, monkeypatch):
    where, error, expected = _failures()[name]
    fake = FakeHub(st_folder, [], monkeypatch)
    setattr(fake, "fail_list" if where == "list" else "fail_download", error)
    cache = str(tmp_path / "cache")
    with pytest.raises(ModelNotFoundError) as info:
        load_model(REPO, revision="v9", cache_dir=cache)
    message = str(info.value)
    assert expected in message and "\n" not in message
    if name == "disk-full":
        assert cache in message
    # One class of failure is never reported as another.
    others = {e for n, (_, _, e) in _failures().items() if e != expected}
    assert not any(o in message for o in others)


def test_cli_exits_2_with_one_line(st_folder, tmp_path, monkeypatch, capsys):
    fake = FakeHub(st_folder, [], monkeypatch)
    fake.fail_list = hf_errors.GatedRepoError("gated", response=_response(401))
    text = tmp_path / "in.txt"
    text.write_text("你好\n", encoding="utf-8")
    rc = cli.main(["encode", "--model", REPO, "--revision", "main", "--token", "tok",
                   "--cache-dir", str(tmp_path / "c"), "--input", str(text),
                   "--output", str(tmp_path / "out.npy")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "needs a token" in err
    assert ("info", REPO, "main", "tok", None) in fake.calls


def test_one_commit_for_the_whole_download(st_folder, tmp_path, monkeypatch):
    """A push lands on the branch after the first file: every file still comes from the commit
    the branch named when the download began (per-file resolution mixed two snapshots), and the
    branch is recorded in the cache, so huggingface_hub's own offline lookup finds the snapshot."""
    real_snapshot_download = huggingface_hub.snapshot_download
    fake = FakeHub(st_folder, [], monkeypatch)
    fake.push_after = 1
    cache = str(tmp_path / "cache")
    folder = hub.download(REPO, revision="main", cache_dir=cache)
    gets = [c for c in fake.calls if c[0] == "get"]
    assert len(gets) > 2 and fake.head == COMMIT_2  # the push did land mid-download
    assert {c[2] for c in gets} == {COMMIT_1}, gets
    assert os.path.basename(folder) == COMMIT_1
    assert sorted(os.listdir(os.path.dirname(folder))) == [COMMIT_1]  # one snapshot, complete
    assert sorted(c[1] for c in gets) == sorted(
        os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
        for d, _, fs in os.walk(folder) for f in fs)
    with open(os.path.join(cache, "models--owner--tiny-sbert", "refs", "main")) as f:
        assert f.read() == COMMIT_1
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real_snapshot_download)
    assert real_snapshot_download(REPO, revision="main", cache_dir=cache,
                                  local_files_only=True) == folder
