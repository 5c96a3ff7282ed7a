"""orbax save/restore of encoder parameters (the `params/` folder of an sbert-flax model dir).

Parameters are stored as a plain nested dict of float32 arrays with string keys (layer indices
as "0", "1", ...), so the files do not depend on NNX internals and restore bit-exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS_DIR = "params"


def _stringify_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _stringify_keys(v) for k, v in tree.items()}
    return tree


def _restore_int_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _restore_int_keys(v)
                for k, v in tree.items()}
    return tree


def save_params(directory: str, params: Mapping) -> None:
    """Writes `params` (nested dict of arrays) to `directory/params` with orbax."""
    host = jax.tree.map(lambda x: np.asarray(x), _stringify_keys(params))
    # Host arrays are written by the calling process alone: in a multi-process job only one
    # process exports, so orbax must not wait for the others at its barriers.
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=mp) as ckptr:
        ckptr.save(os.path.abspath(os.path.join(directory, PARAMS_DIR)), host)
        ckptr.wait_until_finished()


def load_params(directory: str) -> dict:
    """Reads `directory/params` back as a nested dict of numpy arrays (int layer keys)."""
    path = os.path.abspath(os.path.join(directory, PARAMS_DIR))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{directory}: no '{PARAMS_DIR}/' orbax checkpoint found")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot restore orbax checkpoint ({type(e).__name__}: {e})") from None
    return _restore_int_keys(jax.tree.map(np.asarray, tree))
