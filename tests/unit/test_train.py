"""train.py drives its rollout engine through the RolloutEngine protocol and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from titan_rl import train
from titan_rl.rl.rollout import NativeEngine

SMOKE = str(Path(__file__).resolve().parents[2] / "train_configs/smoke_cpu.toml")


class ProtocolOnlyEngine:
    """A third engine: exactly the protocol's methods (no ``generator``), recording their calls.

    Its RNG state is a dict, not the native engine's list: the trainer must store it as it is."""

    __slots__ = ("calls", "inner")

    def __init__(self, inner: NativeEngine) -> None:
        self.inner, self.calls = inner, []

    def generate(self, prompts, params):
        self.calls.append("generate")
        return self.inner.generate(prompts, params)

    def update_weights(self, model) -> None:
        self.calls.append("update_weights")
        self.inner.update_weights(model)

    def sleep(self) -> None:
        self.calls.append("sleep")

    def wake_up(self) -> None:
        self.calls.append("wake_up")

    def rng_state(self) -> dict:
        self.calls.append("rng_state")
        return {"native": self.inner.rng_state()}

    def set_rng_state(self, state: dict) -> None:
        self.calls.append(("set_rng_state", state))
        self.inner.set_rng_state(state["native"])


@pytest.fixture
def engines(monkeypatch) -> list[ProtocolOnlyEngine]:
    """Every engine train.py builds from now on is a ProtocolOnlyEngine; the list holds them."""
    built: list[ProtocolOnlyEngine] = []

    def build_engine(cfg, model):
        built.append(ProtocolOnlyEngine(NativeEngine(model, seed=cfg.job.seed)))
        return built[-1]

    monkeypatch.setattr(train, "build_engine", build_engine)
    return built


def test_the_trainer_uses_only_the_engine_protocol(tmp_path, engines):
    args = ["--config", SMOKE, f"--job.dump_folder={tmp_path}", "--checkpoint.enable=true"]
    args += ["--checkpoint.interval=2", "--rollout.prompts_per_step=2", "--rollout.max_new_tokens=4"]
    assert train.main([*args, "--training.steps=2"]) == 0
    step = ["wake_up", "generate", "sleep", "update_weights"]
    assert engines[0].calls == [*step, *step, "rng_state"]  # saved after step 2
    saved = engines[0].inner.rng_state()

    assert train.main([*args, "--training.steps=3"]) == 0  # resumes from step 2
    resumed = engines[1].calls
    assert resumed[0] == ("set_rng_state", {"native": saved})
    assert resumed[1:] == [*step, "rng_state"]
