"""Which concepts an evaluation runs (spec section 7): the first N of the concept file, or an explicit id list.

An id list is a JSON list of concept ids, the format of the original's `--concept-ids-file`
(its repository ships the held-in / held-out Concept16k lists, bundled here under short
names). Ids are looked up in the concept file, never taken as row numbers, and keep their
type: the prompt sample is seeded by the id, so 80 and "80" are different concepts.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Sequence

from flas_vllm.eval.generate import Concept, ConceptId

BUNDLED_ID_LISTS = {
    f"c16k-{size}-{split}100": f"eval_c16k_{size}_{split}100.json" for size in ("2b", "9b") for split in ("hi", "ho")
}
"""Short name -> bundled file: FLAS's held-in (hi) / held-out (ho) Concept16k lists for Gemma-2-2B / 9B."""


def resolve_ids_file(name_or_path: str | Path) -> Path:
    """An existing file, or one of the bundled lists by its short name or file name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    bundled = BUNDLED_ID_LISTS.get(name) or (name if name in BUNDLED_ID_LISTS.values() else None)
    if bundled is None:
        raise FileNotFoundError(f"--concept-ids-file: {name} is neither a file nor a bundled list "
                                f"({', '.join(sorted(BUNDLED_ID_LISTS))})")
    return Path(str(resources.files("flas_vllm.data").joinpath(bundled)))


def load_concept_ids(name_or_path: str | Path) -> list[ConceptId]:
    """A JSON list of integer or string ids, each once."""
    path = resolve_ids_file(name_or_path)
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"--concept-ids-file: {path} is not JSON: {exc}") from None
    if not isinstance(ids, list) or not ids:
        raise ValueError(f"--concept-ids-file: {path} must hold a non-empty JSON list of concept ids")
    for i, cid in enumerate(ids):
        if isinstance(cid, bool) or not isinstance(cid, (int, str)) or cid == "":
            raise ValueError(f"--concept-ids-file: {path} entry {i} is {cid!r}; ids are integers or non-empty strings")
    seen: set = set()
    repeated = [cid for cid in ids if cid in seen or seen.add(cid)]
    if repeated:
        raise ValueError(f"--concept-ids-file: {path} lists these ids more than once: {_names(repeated)}")
    return ids


def select_concepts(concepts: Sequence[Concept], *, ids: Sequence[ConceptId] | None = None,
                    num: int | None = None, source: str = "the concept file") -> list[Concept]:
    """`ids` in their given order (unknown ids refused, by name), else the first `num` in file order, else all."""
    if ids is not None and num is not None:
        raise ValueError("--num-concepts and --concept-ids-file both choose concepts: give one of them")
    if ids is not None:
        by_id = {c.concept_id: c for c in concepts}
        unknown = [cid for cid in ids if cid not in by_id]
        if unknown:
            hint = ""
            as_text = {str(c): c for c in by_id}
            retyped = [cid for cid in unknown if str(cid) in as_text]
            if retyped:
                hint = (f"; {_names(retyped[:3])} match ids of the other type ({_names([as_text[str(c)] for c in retyped[:3]])}): "
                        "ids keep their type, 80 and \"80\" differ")
            raise ValueError(f"--concept-ids-file: {len(unknown)} of {len(ids)} ids are not in {source}: "
                             f"{_names(unknown)}{hint}")
        return [by_id[cid] for cid in ids]
    if num is not None:
        if not 1 <= num <= len(concepts):
            raise ValueError(f"--num-concepts must be within [1, {len(concepts)}] (concepts in {source}), got {num}")
        return list(concepts[:num])
    return list(concepts)


def _names(ids: Sequence[ConceptId], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
