"""OCR reward: the real PP-OCR models shipped in the rapidocr_onnxruntime wheel read PIL-rendered text;
misspellings score lower by exactly their edit distance; the parsing and scoring rules."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import rewards
from rewards.ocr import OcrReward, levenshtein, ocr_accuracy, quoted_text

FAST = dict(det_limit_type="max", det_limit_side_len=320)  # RapidOCR's defaults upscale small images to 736


def render(text, w=192, h=64, size=28):
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).text((8, 16), text, fill="black", font=ImageFont.load_default(size=size))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr_onnxruntime", reason="pip install 'denoise-gym[rewards]' for the OCR reward")
    return OcrReward(**FAST)


def test_reads_pil_text_and_scores_misspellings_lower(ocr):
    images = torch.stack([render("HELLO"), render("HELO"), render("HXLLQ"), render(""), render("OPEN 24")])
    prompts = ['a sign that says "hello"'] * 4 + ['a shop window, "Open 24" in neon']
    r, info = ocr(images, prompts)
    assert info["ocr_text"][0] == "HELLO" and info["ocr_text"][4].replace(" ", "") == "OPEN24"
    assert info["target"] == ["hello"] * 4 + ["Open 24"]
    assert r[0].item() == 1.0 and r[4].item() == 1.0  # case and spaces do not count
    assert r[1].item() == pytest.approx(1 - 1 / 5)  # one letter missing
    assert r[2].item() == pytest.approx(1 - 2 / 5)  # two letters wrong
    assert r[3].item() == 0.0  # nothing written
    assert r.dtype == torch.float32 and r.shape == (5,)
    # the registry builds the same reward; PIL input works
    made = rewards.make_reward("ocr", **FAST)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images[:2]]
    torch.testing.assert_close(made(pil, prompts[:2])[0], r[:2])


def test_quoted_text_and_accuracy_rules():
    assert quoted_text('a sign that says "Hello  World"') == "Hello  World"
    assert quoted_text("a “curly” and a \"straight\" quote") == "curly straight"
    assert quoted_text("no quotes here, isn't it") is None
    assert quoted_text('empty "" quotes') is None
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert ocr_accuracy("Hello World", "hello world") == 1.0
    assert ocr_accuracy("Hello", "hello", case_sensitive=True) == pytest.approx(0.8)
    assert ocr_accuracy("ab cd", "abcd", keep_spaces=True) == pytest.approx(0.8)
    assert ocr_accuracy("abc", "a completely different long text") == 0.0  # clipped at 0
    assert ocr_accuracy("abcd", "abcdxx") == pytest.approx(0.5)  # extra characters cost too


class FakeEngine:
    """RapidOCR's call convention: bgr uint8 [H, W, 3] -> ([[box, text, confidence], ...] | None, timings)."""

    def __init__(self, lines):
        self.lines, self.seen = lines, []

    def __call__(self, bgr):
        self.seen.append(bgr)
        return (self.lines or None), [0.0]


def test_engine_contract_confidence_and_missing_quotes():
    box = [[0, 0], [1, 0], [1, 1], [0, 1]]
    eng = FakeEngine([[box, "HEL", 0.9], [box, "junk", 0.2], [box, "LO", 0.8]])
    reward = OcrReward(eng, min_confidence=0.5)
    img = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    img[0, 0] = 255  # pure red in RGB
    r, info = reward(img, ['"hello"'])
    assert info["ocr_text"] == ["HEL LO"] and r.item() == 1.0
    assert eng.seen[0].shape == (4, 4, 3) and eng.seen[0][0, 0].tolist() == [0, 0, 255]  # BGR, as RapidOCR expects
    assert OcrReward(FakeEngine([]))(img, ['"x"'])[0].item() == 0.0
    with pytest.raises(ValueError, match=r"prompts\[1\]='a cat' has no text in double quotes"):
        reward(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ['"a"', "a cat"])
    r, info = OcrReward(eng, on_missing="zero")(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ['"hello"', "a cat"])
    assert r[1].item() == 0.0 and info["target"][1] is None and len(eng.seen) == 2  # no OCR without a target
    with pytest.raises(ValueError, match="on_missing='skip'"):
        OcrReward(eng, on_missing="skip")
    with pytest.raises(ValueError, match="min_confidence=2"):
        OcrReward(eng, min_confidence=2)
    with pytest.raises(ValueError, match="configure it instead"):
        OcrReward(eng, det_limit_side_len=320)


def test_ocr_prompt_set_quotes_one_target_each():
    from diffusion_env.prompts import OCR_WORDS, prompt_set

    prompts = prompt_set("ocr_words")
    assert len(prompts) == 4 * len(OCR_WORDS)
    assert {quoted_text(p) for p in prompts} == set(OCR_WORDS)
