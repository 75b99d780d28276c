"""What the Triton launch policy (kdc_kernels/_launch.py) decides for every kernel an op launches,
as a GPU would see it, also where the kernels run on the CPU interpreter.

The interpreter ignores launch configurations (``_launch.choose`` gives it the kernel's interpreter
config whatever the mode), so running an op twice under ``KDC_DETERMINISTIC=1`` on a CPU proves
nothing about pinning. :func:`record` wraps ``_launch.choose``: for every launch it first asks the
real policy what a compiled kernel would get (``_launch.interpreted`` answering False, a fake
``triton.testing.do_bench`` that makes the *last* config the fastest and counts the configs it
times, a fresh autotuning cache), records that, then lets the launch go on with the real decision.
It also counts the kernels actually launched (``run`` of Triton's JIT and interpreted functions),
so a launcher that bypasses the policy shows up as a launch without a decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import triton
import triton.runtime.interpreter
import triton.runtime.jit

from kdc_kernels import _launch


@dataclass
class Decision:
    kernel: object
    configs: list
    pick: dict  # the config a compiled kernel gets
    timed: int  # configs the (fake) autotuner timed for this decision

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", repr(self.kernel))


@dataclass
class Record:
    decisions: list = field(default_factory=list)
    launched: list = field(default_factory=list)  # kernel objects, one entry per launch

    def clear(self) -> None:
        self.decisions.clear()
        self.launched.clear()

    def undecided(self) -> list[str]:
        """Kernels launched without a decision of the policy."""
        decided = {id(d.kernel) for d in self.decisions}
        return sorted({getattr(k, "__name__", repr(k)) for k in self.launched if id(k) not in decided})

    def assert_pinned(self) -> None:
        """Every launch went through the policy, which gave every kernel its pinned (first) config
        without timing anything; at least one kernel had a choice (so the check is not vacuous)."""
        assert self.launched, "no Triton kernel was launched"
        assert not self.undecided(), f"launched without the launch policy: {self.undecided()}"
        for d in self.decisions:
            assert d.timed == 0, f"{d.name}: {d.timed} configs timed in a pinned mode"
            assert d.pick == d.configs[0], f"{d.name}: got {d.pick}, pinned {d.configs[0]}"
        assert any(len(d.configs) > 1 for d in self.decisions), "no kernel has more than one config"

    def assert_autotuned(self) -> None:
        """The control: outside the pinned modes a kernel with several configs gets the one the
        (fake) timer measured fastest, the last."""
        tuned = [d for d in self.decisions if len(d.configs) > 1]
        assert tuned, "no kernel has more than one config"
        for d in tuned:
            assert d.timed == len(d.configs) and d.pick == d.configs[-1], (d.name, d.timed, d.pick)


def record(monkeypatch) -> Record:
    """Start recording (undone with the ``monkeypatch`` fixture)."""
    rec = Record()
    real_choose, real_interpreted = _launch.choose, _launch.interpreted
    monkeypatch.setattr(_launch, "_TUNED", {})

    def choose(kernel, configs, interpret, key, launch, device):
        timed = []

        def fake_do_bench(fn, warmup=None, rep=None, return_mode=None, **_):
            timed.append(len(timed))
            return float(len(configs) - len(timed) + 1)  # 1st config slowest, last fastest

        saved = (_launch.interpreted, _launch._TUNED, triton.testing.do_bench)
        _launch.interpreted, _launch._TUNED, triton.testing.do_bench = (lambda k: False), {}, fake_do_bench
        try:
            pick = real_choose(kernel, configs, interpret, key, lambda config: None, device)
        finally:
            _launch.interpreted, _launch._TUNED, triton.testing.do_bench = saved
        rec.decisions.append(Decision(kernel, list(configs), pick, len(timed)))
        return real_choose(kernel, configs, interpret, key, launch, device)

    monkeypatch.setattr(_launch, "choose", choose)
    assert _launch.interpreted is real_interpreted
    for cls in (triton.runtime.interpreter.InterpretedFunction, triton.runtime.jit.JITFunction):
        real_run = cls.run

        def run(self, *args, _real=real_run, **kwargs):
            if not kwargs.get("warmup", False):
                rec.launched.append(self)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return rec
