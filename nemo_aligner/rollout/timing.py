"""Per-phase wall time and tokens of an online-RL step (generation, reference, policy, ...), logged as
`time/<phase>` (seconds) and `tokens_per_sec/<phase>` (tokens the phase processed, over all data-parallel
ranks, per second of this rank's time). What a phase counts is its caller's choice; GRPO counts generated
tokens for generation and the rows' real tokens (prompt + completion) for the reference and policy passes."""

import time
from contextlib import contextmanager


class PhaseTimes:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def add_tokens(self, name: str, tokens: float) -> None:
        self.tokens[name] = self.tokens.get(name, 0.0) + float(tokens)

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, seconds in self.seconds.items():
            out[f"time/{name}"] = seconds
            if name in self.tokens:
                out[f"tokens_per_sec/{name}"] = self.tokens[name] / max(seconds, 1e-9)
        return out
