"""Secrets never reach disk, and every documented way of passing an API key reaches the server."""

from __future__ import annotations

import json

import pytest
import torch

from rewards.secrets import REDACTED, drop_redacted, is_secret_key, redact, resolve_api_key
from rewards.server import serve_in_thread


@pytest.mark.parametrize("key", ["api_key", "API_KEY", "apiKey", "hf_token", "token", "password", "client_secret",
                                 "Authorization", "aws-secret-key", "private_key", "credentials"])  # fmt: skip
def test_credential_keys_are_secret(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["api_key_env", "max_tokens", "token_file", "tokenizer", "model", "base_url",
                                 "author", "num_tokens", "secretary_name"])  # fmt: skip
def test_names_of_secrets_and_lookalikes_are_not(key):
    assert not is_secret_key(key)


def test_redact_is_deep_and_drop_redacted_undoes_it():
    cfg = {"env_kwargs": {"reward_kwargs": {"api_key": "sk-1", "api_key_env": "K", "max_tokens": 5},
                          "components": [{"headers": {"Authorization": "Bearer x"}}]},
           "seed": 0, "token": None}  # fmt: skip
    out = redact(cfg)
    assert out["env_kwargs"]["reward_kwargs"] == {"api_key": REDACTED, "api_key_env": "K", "max_tokens": 5}
    assert out["env_kwargs"]["components"][0]["headers"]["Authorization"] == REDACTED
    assert out["token"] is None  # nothing to hide
    assert cfg["env_kwargs"]["reward_kwargs"]["api_key"] == "sk-1"  # a copy: the caller's dict is untouched
    assert drop_redacted(out)["env_kwargs"]["reward_kwargs"] == {"api_key_env": "K", "max_tokens": 5}


def test_resolve_api_key_order_and_errors(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai")
    monkeypatch.setenv("MY_KEY", "from-my-key")
    assert resolve_api_key("explicit", "MY_KEY") == "explicit"
    assert resolve_api_key(None, "MY_KEY") == "from-my-key"
    assert resolve_api_key(None, None) == "from-openai"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert resolve_api_key(None, None) is None  # local servers need none
    with pytest.raises(ValueError, match=r"api_key_env='MISSING_KEY' but \$MISSING_KEY is not set"):
        resolve_api_key(None, "MISSING_KEY")
    with pytest.raises(ValueError, match="placeholder"):
        resolve_api_key(REDACTED)


def test_a_resumed_config_falls_back_to_the_environment():
    from agents.config import TrainConfig
    from agents.trainer import config_json

    cfg = TrainConfig(env_kwargs={"reward_kwargs": {"api_key": "sk-live-123", "model": "m"}})
    text = config_json(cfg)
    assert "sk-live-123" not in text and REDACTED in text
    back = TrainConfig.from_dict(json.loads(text))
    assert back.env_kwargs == {"reward_kwargs": {"model": "m"}}


def _describe(images: torch.Tensor) -> list[str]:
    return ["a red circle" for _ in range(images.shape[0])]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("way", ["argument", "api_key_env", "OPENAI_API_KEY", "local_server_argument"])
def test_secret_passed_each_documented_way_reaches_the_server_and_no_file(tiny_sd, tmp_path, monkeypatch, way):
    """A tiny prompt-alignment run whose server requires the key: the run succeeds only if the key was
    sent, and afterwards no file anywhere under the run directory holds it."""
    from agents.config import TrainConfig
    from agents.trainer import Trainer

    secret = f"sk-test-{way}-0123456789abcdef"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    stop = None
    if way == "local_server_argument":  # no base_url: the reward's own server, key given as an argument
        reward_kwargs = {"api_key": secret}
    else:
        url, stop = serve_in_thread(_describe, token=secret)
        reward_kwargs = {"base_url": url}
        if way == "argument":
            reward_kwargs["api_key"] = secret
        elif way == "api_key_env":
            monkeypatch.setenv("DENOISE_TEST_KEY", secret)
            reward_kwargs["api_key_env"] = "DENOISE_TEST_KEY"
        else:
            monkeypatch.setenv("OPENAI_API_KEY", secret)
    run = tmp_path / "run"
    env_kwargs = dict(model=str(tiny_sd), height=16, width=16, prompts=["a red circle", "a blue square"],
                      reward_kwargs=reward_kwargs)  # fmt: skip
    cfg = TrainConfig(env_id="Denoise-Tiny-PromptAlignment-v0", algo="ddpo-is", num_epochs=1, samples_per_epoch=2,
                      sample_batch_size=2, train_batch_size=2, micro_batch_size=16, num_steps=2, num_eval_prompts=1,
                      per_prompt_min_count=2, per_prompt_buffer_size=8, env_kwargs=env_kwargs, run_dir=str(run),
                      progress=False)  # fmt: skip
    try:
        with Trainer(cfg) as trainer:
            history = trainer.train()
    finally:
        if stop is not None:
            stop()
    assert len(history) == 1 and history[0]["charts/skipped_update"] == 0  # the server accepted the key
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "state.json" for p in files) and any("tfevents" in p.name for p in files)
    leaks = [str(p.relative_to(run)) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks, f"the secret was written to {leaks}"
    if way in ("argument", "local_server_argument"):
        assert json.loads((run / "config.json").read_text())["env_kwargs"]["reward_kwargs"]["api_key"] == REDACTED


def test_a_wrong_key_is_refused_by_the_server(tmp_path):
    from rewards import RewardServerError, TinyPromptAlignment

    url, stop = serve_in_thread(_describe, token="right")
    try:
        reward = TinyPromptAlignment(base_url=url, api_key="wrong", max_retries=0, scorer=_NoScorer())
        with pytest.raises(RewardServerError, match="HTTP 401"):
            reward(torch.zeros(1, 3, 8, 8), ["a red circle"])
        reward.close()
    finally:
        stop()


class _NoScorer:
    def score(self, cands, refs):
        raise AssertionError("not reached")
