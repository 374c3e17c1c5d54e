"""Read the lines attnres itself wrote to a process's stderr (other packages' warnings are not ours to count)."""


def attnres_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("attnres:")]
