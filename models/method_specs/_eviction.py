"""Arithmetic the eviction specs share: a total budget split into a first part (sink tokens,
heavy hitters) of 1/8, at most the default, and the most recent tokens."""


def split_budget(first_key: str, default_first: int):
    def from_number(n: int) -> dict:
        first = min(default_first, n // 8)
        return {first_key: first, "recent": n - first}
    return from_number
