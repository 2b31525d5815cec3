"""The rollout-engine protocol: documented in full, implemented in full by both engines; the native
engine's lifecycle methods (no-op sleep / wake, RNG state) keep its sampling reproducible."""

from __future__ import annotations

import inspect
import pickle

from tests.conftest import tiny_model
from titan_rl.rl.rollout import NativeEngine, RolloutEngine, SamplingParams
from titan_rl.rl.rollout.vllm_engine import VllmEngine

PROMPTS = [[5, 9, 13], [1, 2, 3, 4, 5, 6, 7], [42]]
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=6)  # random draws, not greedy


def protocol_methods() -> dict[str, object]:
    return {name: fn for name, fn in vars(RolloutEngine).items() if callable(fn) and not name.startswith("_")}


def test_the_protocol_is_the_trainers_whole_lifecycle_and_documented():
    methods = protocol_methods()
    assert set(methods) == {"generate", "update_weights", "sleep", "wake_up", "rng_state", "set_rng_state"}
    for name, fn in methods.items():
        assert inspect.getdoc(fn), f"RolloutEngine.{name} has no docstring"


def test_both_engines_implement_every_protocol_method_with_its_parameters():
    for engine in (NativeEngine, VllmEngine):
        for name, fn in protocol_methods().items():
            assert callable(getattr(engine, name, None)), f"{engine.__name__} lacks {name}"
            expected = list(inspect.signature(fn).parameters)
            got = list(inspect.signature(getattr(engine, name)).parameters)
            assert got == expected, f"{engine.__name__}.{name}{got} != RolloutEngine.{name}{expected}"


def completions(engine: NativeEngine) -> list[tuple[list[int], list[float]]]:
    return [(c.tokens, c.logprobs) for c in engine.generate(PROMPTS, SAMPLED)]


def test_native_rng_state_resumes_sampling_in_another_engine():
    """What a checkpoint stores (pickled) puts a fresh engine where the saving one was."""
    model = tiny_model(seed=1).eval()
    engine = NativeEngine(model, seed=0)
    completions(engine)  # the state to save is not the seed's
    saved = pickle.loads(pickle.dumps(engine.rng_state()))
    uninterrupted = completions(engine)
    resumed = NativeEngine(model, seed=7)
    resumed.set_rng_state(saved)
    assert completions(resumed) == uninterrupted
    assert completions(NativeEngine(model, seed=7)) != uninterrupted  # the state, not luck


def test_native_sleep_and_wake_up_change_nothing():
    model = tiny_model(seed=2).eval()
    awake, slept = NativeEngine(model, seed=3), NativeEngine(model, seed=3)
    slept.sleep()
    slept.wake_up()
    assert completions(slept) == completions(awake)
    slept.sleep()  # and generate works without an explicit wake_up
    assert completions(slept) == completions(awake)
