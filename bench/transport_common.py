"""What the parts of bench/transport.py share: the seed and how long each part runs."""

from __future__ import annotations

from dataclasses import dataclass

SEED = 0


@dataclass(frozen=True)
class Settings:
    rounds: int  # alternating rounds of parts 1 and 2
    messages: int  # round trips (or bursts) per contender per round
    warmup: int  # untimed round trips per contender before the rounds
    pipe_rounds: int  # stage timing + chain rounds of parts 3 and 4
    inputs: int  # inputs per chain run
    ceiling_inputs: int  # inputs per ceiling run (part 4: long enough to be more than the start)
    calib: int  # timed stage runs per stage per timing


FULL = Settings(rounds=8, messages=25, warmup=10, pipe_rounds=2, inputs=300, ceiling_inputs=3000, calib=40)
QUICK = Settings(rounds=3, messages=10, warmup=3, pipe_rounds=1, inputs=120, ceiling_inputs=1000, calib=20)
