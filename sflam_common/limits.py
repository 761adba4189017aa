"""Process limits a fleet needs: every MQTT session holds a socket (and paho a wake-up pair), so a
device host, or a broker serving 1,000 sessions, needs more open files than the usual 1,024."""

from __future__ import annotations

FALLBACK_OPEN_FILES = 65536  # when the hard limit is "unlimited"


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (children inherit it); returns
    the soft limit now in force, or -1 where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # not on every platform a device runs
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FALLBACK_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
