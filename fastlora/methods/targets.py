"""Choosing modules of a host by name, the same way for every method, with close names when nothing matches.

A target is peft's: a string is a regex matched against the full module path; a list holds names, each
matching a module whose path equals it or ends with ``"." + name`` ("q_proj" matches
"model.layers.0.self_attn.q_proj"). peft matches LoRA's ``modules_to_save`` by any string suffix
(``any_suffix``); fastlora does too there, so peft's files select the same modules.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

# The task heads transformers models carry, by attribute name: a sequence classifier's (BERT ``classifier``,
# Llama ``score``) and a language model's (``lm_head``). Trained in full beside a method (modules_to_save),
# kept out of LoRA's "all-linear", trained alone by feature extraction.
CLASSIFIER_HEADS = ("classifier", "score")
LM_HEAD = "lm_head"
HEAD_NAMES = (*CLASSIFIER_HEADS, LM_HEAD)

Named = list[tuple[str, nn.Module]]


def matches(path: str, target: str | Sequence[str], *, any_suffix: bool = False) -> bool:
    """Whether module ``path`` is selected by ``target`` (a regex, or names / dotted suffixes; see the module
    docstring)."""
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    if any_suffix:
        return any(path.endswith(name) for name in target)
    return any(path == name or path.endswith("." + name) for name in target)


def close_names(wanted: Iterable[str], paths: Iterable[str]) -> list[str]:
    """Module names (last path components, or full paths) of ``paths`` close to any of ``wanted``: typo hints."""
    paths = list(paths)
    names = sorted({p.rpartition(".")[2] for p in paths} | set(paths))
    return sorted({c for w in wanted for c in difflib.get_close_matches(w, names, n=4, cutoff=0.5)})


def no_match(subject: str, host: nn.Module | str, wanted: Iterable[str], paths: Iterable[str], *,
             kind: str = "module", note: str = "") -> ValueError:  # fmt: skip
    """The error for ``subject`` (e.g. "target_modules ['q_prj']") that selected no ``kind`` of ``host``:
    ``fastlora: <subject> matched no <kind> of <Host>; close names: ...<note>``."""
    host = host if isinstance(host, str) else type(host).__name__
    close = close_names(wanted, paths)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return ValueError(f"fastlora: {subject} matched no {kind} of {host}{hint}{note}")


def select(named: Named, target: str | Sequence[str], host: nn.Module | str, *, subject: str | None = None,
           kind: str = "module", note: str = "", any_suffix: bool = False) -> Named:  # fmt: skip
    """The (path, module) pairs of ``named`` that ``target`` selects; none is a :func:`no_match` ValueError
    (``subject`` defaults to ``target_modules <target>``)."""
    found = [(p, m) for p, m in named if matches(p, target, any_suffix=any_suffix)]
    if not found:
        wanted = [target] if isinstance(target, str) else target
        subject = subject or f"target_modules {target!r}"
        raise no_match(subject, host, wanted, [p for p, _ in named], kind=kind, note=note)
    return found


def select_each(named: Named, names: Sequence[str], host: nn.Module | str, *, what: str = "modules_to_save",
                note: str = "", any_suffix: bool = False) -> Named:  # fmt: skip
    """The pairs of ``named`` matching any of ``names``, each name matching at least one; the names that match
    nothing are a :func:`no_match` ValueError (``<what> [names]``)."""
    found = [(p, m) for p, m in named if matches(p, names, any_suffix=any_suffix)]
    missing = [n for n in names if not any(matches(p, [n], any_suffix=any_suffix) for p, _ in found)]
    if missing:
        raise no_match(f"{what} {missing}", host, missing, [p for p, _ in named], note=note)
    return found


def outermost(found: Named) -> Named:
    """``found`` without the modules inside another one of ``found``."""
    return [(p, m) for p, m in found if not any(p.startswith(q + ".") for q, _ in found if q != p)]


def present(model: nn.Module, names: Sequence[str], *, any_suffix: bool = False) -> list[str]:
    """The entries of ``names`` that match some module of ``model`` (peft lists both ``classifier`` and
    ``score`` for sequence classification: a loader keeps those the host has)."""
    paths = [p for p, _ in model.named_modules()]
    return [n for n in names if any(matches(p, [n], any_suffix=any_suffix) for p in paths)]


def classifier_heads(model: nn.Module) -> list[str]:
    """Names of the sequence-classifier heads among ``model``'s direct children (``classifier`` for BERT,
    ``score`` for Llama), in :data:`HEAD_NAMES` order."""
    return [n for n in CLASSIFIER_HEADS if isinstance(getattr(model, n, None), nn.Module)]
