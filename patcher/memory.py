"""Resident memory of this process, read from the kernel: what the pipeline and the bench report.

Why from the kernel: the question is whether patching holds two copies of the weights, and only the
process's high-water mark (VmHWM) sees every copy, including mapped safetensors pages and memory
that native code (ONNX export) allocates outside Python. The peak can be reset between stages
(`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) so each stage reports its own.
"""

from __future__ import annotations

import resource
from pathlib import Path

STATUS = Path("/proc/self/status")


def peak_rss_bytes() -> int:
    """The high-water mark of resident memory since the last reset (ru_maxrss where /proc is missing)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def current_rss_bytes(field: str = "VmRSS", pid: int | None = None) -> int:
    """VmRSS, or its parts RssAnon (private memory) and RssFile (mapped file pages, e.g. mmap'd weights), of this
    process or of process `pid` (a server the serving bench started)."""
    status = STATUS if pid is None else Path(f"/proc/{pid}/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_snapshot() -> dict[str, int]:
    """The peak since the last reset, and what is resident now, split into private and mapped-file pages."""
    return {"peak_rss": peak_rss_bytes(), "rss_after": current_rss_bytes(),
            "anon_after": current_rss_bytes("RssAnon"), "file_after": current_rss_bytes("RssFile")}


def weight_bytes(directory: Path) -> int | None:
    """Bytes of the base checkpoint's safetensors tensors (None when it has no safetensors weights)."""
    from sasa_patcher.export.base_weights import base_weight_files

    base = base_weight_files(directory)
    if base is None:
        return None
    return sum(entry["data_offsets"][1] - entry["data_offsets"][0] for _, entry in base.tensors.values())
