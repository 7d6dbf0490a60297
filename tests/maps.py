"""Which file a process's memory at an address maps, read from /proc/self/maps by the tests themselves: to check
that a parameter is the checkpoint file's own pages (no copy) rather than this process's anonymous memory."""
import os


def mapped_file(address: int) -> str:
    """The file /proc/self/maps names for the mapping holding `address` ('' for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 else ""
    return ""


def is_file_page(address: int, path) -> bool:
    held = mapped_file(address)
    return bool(held) and os.path.exists(held) and os.path.samefile(held, path)
