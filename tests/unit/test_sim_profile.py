"""Engine simulator profiles and the synthetic tokenizer, answer lengths and embeddings."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from backfill.errors import ConfigError
from backfill.sim.profile import EngineProfile, load_profile
from backfill.sim.tokens import (
    OutputLengths,
    answer_piece,
    count_text_tokens,
    embed,
    ids_prefix_hashes,
    render_chat,
    text_prefix_hashes,
)

EXAMPLE = Path(__file__).parents[2] / "examples" / "sim-h100-llama3-8b.toml"


def test_the_example_profile_spells_out_the_defaults() -> None:
    assert EngineProfile() == load_profile(EXAMPLE)
    assert EngineProfile() == load_profile(None)


def test_the_default_kv_cache_holds_about_450k_tokens() -> None:
    assert 440_000 <= EngineProfile().kv_capacity_tokens <= 460_000


def test_a_profile_file_overrides_defaults_and_takes_integers_for_seconds(tmp_path: Path) -> None:
    path = tmp_path / "profile.toml"
    path.write_text('model = "tiny"\nmax_num_seqs = 8\niteration_base_s = 1\nscheduling_policy = "priority"\n')

    profile = load_profile(path)

    assert ("tiny", 8, 1.0, "priority") == (
        profile.model,
        profile.max_num_seqs,
        profile.iteration_base_s,
        profile.scheduling_policy,
    )
    assert isinstance(profile.iteration_base_s, float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_num_seq = 8", "unknown key(s) max_num_seq"),
        ('max_num_seqs = "8"', "max_num_seqs must be an integer"),
        ("enable_prefix_caching = 1", "enable_prefix_caching must be true or false"),
        ("block_size = true", "block_size must be an integer"),
        ('scheduling_policy = "lifo"', "scheduling_policy must be one of 'fcfs', 'priority'"),
        ("block_size = 0", "block_size must be at least 1"),
        ("time_scale = -1", "time_scale must not be negative"),
        ("num_gpu_blocks = 10", "max_model_len (8192) exceeds the KV cache"),
        ("max_num_seqs = ", "not valid TOML"),
    ],
)
def test_a_bad_profile_file_is_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "profile.toml"
    path.write_text(text + "\n")

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_profile(path)


def test_a_missing_profile_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(tmp_path / "nope.toml")


# --- synthetic tokenizer --------------------------------------------------------------------------------


def test_a_token_is_four_characters_and_a_prompt_at_least_one() -> None:
    assert [1, 1, 1, 2, 25] == [count_text_tokens(text, 4) for text in ("", "abc", "abcd", "abcde", "x" * 100)]


def test_equal_leading_text_gives_equal_leading_block_hashes() -> None:
    shared = "You are a careful reviewer. " * 10  # 280 characters: 4 full blocks of 16 x 4 characters
    first = text_prefix_hashes(shared + "Review the first product.", 4, 16)
    second = text_prefix_hashes(shared + "Review another one entirely.", 4, 16)

    assert 4 == len(first) == len(second)
    assert first[:4] == second[:4]
    assert text_prefix_hashes("x" * 64, 4, 16)[0] != text_prefix_hashes("y" * 64, 4, 16)[0]
    # Chained: a block's hash depends on the blocks before it.
    assert text_prefix_hashes("a" * 64 + "c" * 64, 4, 16)[1] != text_prefix_hashes("b" * 64 + "c" * 64, 4, 16)[1]


def test_chat_prompts_with_the_same_leading_messages_share_blocks() -> None:
    system = ("system", "Answer in French. " * 20)
    first = text_prefix_hashes(render_chat([system, ("user", "Bonjour")]), 4, 16)
    second = text_prefix_hashes(render_chat([system, ("user", "Salut, comment vas-tu?")]), 4, 16)

    assert first[:5] == second[:5]


def test_token_ids_are_hashed_by_block() -> None:
    assert 2 == len(ids_prefix_hashes(list(range(40)), 16))
    assert ids_prefix_hashes(list(range(32)), 16) == ids_prefix_hashes([*range(32), 7, 7], 16)


def test_an_answer_re_tokenizes_to_its_length() -> None:
    for chars_per_token in (1, 3, 4, 7):
        assert 37 == count_text_tokens(answer_piece(chars_per_token) * 37, chars_per_token)


# --- answer lengths, embeddings ---------------------------------------------------------------------------


def test_ignore_eos_generates_exactly_max_tokens() -> None:
    assert (500, "length") == OutputLengths(EngineProfile(output_len_mean=10)).draw(500, ignore_eos=True)


def test_answer_lengths_are_capped_by_max_tokens() -> None:
    lengths = OutputLengths(EngineProfile(output_len_mean=100, output_len_dist="fixed"))

    assert [(100, "stop"), (50, "length"), (100, "length")] == [
        lengths.draw(200, False),
        lengths.draw(50, False),
        lengths.draw(100, False),
    ]


def test_exponential_lengths_have_the_mean_and_repeat_with_the_seed() -> None:
    def sample() -> list[int]:
        lengths = OutputLengths(EngineProfile(output_len_mean=200, seed=3))
        return [lengths.draw(100_000, False)[0] for _ in range(20_000)]

    first = sample()

    assert first == sample()
    assert 190 <= statistics.fmean(first) <= 210
    assert 1 == min(first)


def test_uniform_lengths_stay_within_twice_the_mean() -> None:
    lengths = OutputLengths(EngineProfile(output_len_mean=50, output_len_dist="uniform"))
    sample = [lengths.draw(1000, False)[0] for _ in range(5000)]

    assert (1, 99) == (min(sample), max(sample))


def test_embeddings_are_deterministic_unit_vectors() -> None:
    vector = embed("hello", 16)

    assert vector == embed("hello", 16)
    assert vector != embed("hello!", 16)
    assert 16 == len(vector)
    assert math.isclose(1.0, math.fsum(x * x for x in vector))
