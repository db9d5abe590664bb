"""A small OCR text-line recognizer (CRNN-style, conv only, CTC), trained on rendered stdlib-docstring words.

The shape of a mobile OCR recognizer such as PaddleOCR's PP-OCR rec models: strided 3x3 convs, depthwise
3x3 + pointwise 1x1 blocks that squeeze the height to 1, a 1x1 neck and a per-column linear classifier over
the width (32 time steps), trained with CTC and read with greedy CTC decoding.

Data: words from the docstrings of a fixed list of standard-library modules (``inspect.getdoc``), split *by
word* into training and held-out words, joined into lines of 4-12 characters and rendered with Pillow in
three DejaVu fonts that ship with matplotlib, dark on light with jitter and noise, 1 x 32 x 128 grayscale.
Nothing is downloaded.

Outputs: model.onnx (input "input" [batch, 1, 32, 128] float32 in [0, 1]; output "logits" [batch, 32,
classes], class 0 the CTC blank and class i the alphabet's character i - 1), eval.npz ("input", "labels"
[n, 12] int64 class ids padded with 0, "label_lengths" [n] int64), calib.npz (the 256 images of the
first four training batches, "input"), eval.txt / calib.txt (the lines); the alphabet is in manifest.json.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import onnxruntime as ort
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch import nn

from models.ctc import edit_distance, greedy_decode

SEED = 0
HEIGHT, WIDTH = 32, 128
MIN_CHARS, MAX_CHARS = 4, 12
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;'-()"
N_CLASSES = len(ALPHABET) + 1  # class 0 is the CTC blank
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
FONT_SIZE = 28  # rendering size; every line is then scaled to HEIGHT
EVAL_WORD_FRACTION = 0.2
NECK = 480  # the width of PP-OCRv4's recognition neck, whose 1x1 convs are 480 -> 480
STEPS = 350
BATCH = 64
LEARNING_RATE = 3e-3
N_CALIB = 256
N_EVAL = 512

# Modules whose docstrings supply the words. Docstrings change between Python versions, so the lines
# (not the selection logic) are pinned by saving them as calib.txt / eval.txt.
TEXT_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "gzip", "heapq", "http.client", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "os", "pathlib", "pickle", "queue", "random", "re",
    "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip

# A word as printed in prose: letters/digits joined by ' - or ., maybe in parentheses, maybe followed by
# one of .,:; -- this drops code (underscores, operators, quotes, backticks) and keeps the alphabet.
_TOKEN = re.compile(r"^\(?[A-Za-z0-9]+(?:['\-.][A-Za-z0-9]+)*\)?[.,:;]?$")


# --- text -------------------------------------------------------------------------------------


def docstrings(module_name: str) -> list[str]:
    """inspect.getdoc of a module and of the classes and functions defined in it."""
    module = importlib.import_module(module_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # typing.io / typing.re warn on any access
        found = [inspect.getdoc(module)]
        for _, obj in inspect.getmembers(module):
            if getattr(obj, "__module__", None) == module.__name__ and (
                inspect.isclass(obj) or inspect.isfunction(obj)
            ):
                found.append(inspect.getdoc(obj))
    return [d for d in found if isinstance(d, str) and d]


def word_key(token: str) -> str:
    """The word a token spells, whatever its case and punctuation: the unit of the train/eval split."""
    return re.sub(r"[^a-z0-9]", "", token.lower())


def collect_tokens() -> tuple[list[str], list[str]]:
    """Unique docstring tokens split by word (held-out words never occur in training): (train, eval)."""
    tokens = sorted(
        {t for name in TEXT_MODULES for doc in docstrings(name) for t in doc.split()
         if len(t) <= MAX_CHARS and _TOKEN.match(t)}
    )  # fmt: skip
    words = sorted({word_key(t) for t in tokens})
    random.Random(SEED).shuffle(words)
    held_out = set(words[: int(len(words) * EVAL_WORD_FRACTION)])
    return [t for t in tokens if word_key(t) not in held_out], [t for t in tokens if word_key(t) in held_out]


def make_line(tokens: list[str], rng: random.Random) -> str:
    """Tokens joined by spaces to a random target length of MIN_CHARS..MAX_CHARS characters."""
    while True:
        target = rng.randint(MIN_CHARS, MAX_CHARS)
        line = rng.choice(tokens)
        for _ in range(8):
            if len(line) >= target:
                break
            token = rng.choice(tokens)
            if len(line) + 1 + len(token) <= MAX_CHARS:
                line = f"{line} {token}"
        if MIN_CHARS <= len(line) <= MAX_CHARS:
            return line


def encode(line: str) -> list[int]:
    return [ALPHABET.index(c) + 1 for c in line]


# --- rendering --------------------------------------------------------------------------------


def load_fonts() -> list[ImageFont.FreeTypeFont]:
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [ImageFont.truetype(str(folder / name), FONT_SIZE) for name in FONTS]


def render(line: str, font: ImageFont.FreeTypeFont, rng: np.random.RandomState) -> np.ndarray:
    """One text line, HEIGHT x WIDTH uint8, dark on light.

    The line is drawn on a canvas as tall as the font (ascent + descent, not the ink), so capitals,
    x-height and descenders keep their place whatever the text; then scaled to HEIGHT with a random
    horizontal stretch, squeezed to fit when too wide, and placed at a random left offset. Jitter:
    vertical shift, background and ink levels, an occasional blur, Gaussian noise."""
    ascent, descent = font.getmetrics()
    margin = 3
    canvas_h = ascent + descent + 2 * margin
    canvas_w = int(np.ceil(font.getlength(line))) + 2 * margin
    background, ink = int(rng.randint(170, 256)), int(rng.randint(0, 90))
    image = Image.new("L", (canvas_w, canvas_h), background)
    ImageDraw.Draw(image).text((margin, margin + rng.randint(-2, 3)), line, font=font, fill=ink)
    if rng.rand() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))

    left = int(rng.randint(0, 5))
    width = round(canvas_w * HEIGHT / canvas_h * rng.uniform(0.85, 1.15))
    width = max(1, min(width, WIDTH - left))
    out = Image.new("L", (WIDTH, HEIGHT), background)
    out.paste(image.resize((width, HEIGHT), Image.BILINEAR), (left, 0))
    pixels = np.asarray(out, dtype=np.float32) + rng.normal(0.0, rng.uniform(0, 10), (HEIGHT, WIDTH))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_set(
    tokens: list[str], n: int, seed: int, fonts: list[ImageFont.FreeTypeFont]
) -> tuple[list[str], np.ndarray]:
    """n lines and their images (n x 1 x HEIGHT x WIDTH float32 in [0, 1]); the same for the same seed."""
    text_rng, pixel_rng = random.Random(seed), np.random.RandomState(seed)
    lines = [make_line(tokens, text_rng) for _ in range(n)]
    images = np.stack([render(line, fonts[i % len(fonts)], pixel_rng) for i, line in enumerate(lines)])
    return lines, (images[:, None] / np.float32(255.0)).astype(np.float32)


def training_batch(tokens: list[str], step: int, fonts) -> tuple[list[str], np.ndarray]:
    """The lines of training step ``step``: every batch is rendered afresh from its own seed."""
    return render_set(tokens, BATCH, SEED + 1000 + step, fonts)


def pad_labels(lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((len(lines), MAX_CHARS), dtype=np.int64)
    for i, line in enumerate(lines):
        labels[i, : len(line)] = encode(line)
    return labels, np.array([len(line) for line in lines], dtype=np.int64)


# --- model ------------------------------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int, kernel=3, stride=1, groups: int = 1) -> list[nn.Module]:
    kernel = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    padding = (kernel[0] // 2, kernel[1] // 2)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU()]


class Recognizer(nn.Module):
    """1 x 32 x 128 -> 256 x 1 x 32 features -> NECK x 1 x 32 -> per-column logits (batch, 32, N_CLASSES)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(1, 32, 3, 2),  # 16 x 64
            *conv_bn_relu(32, 64, 3, 2),  # 8 x 32
            *conv_bn_relu(64, 64, 3),
            *conv_bn_relu(64, 128, 1),
            *conv_bn_relu(128, 128, 3, (2, 1), groups=128),  # 4 x 32, depthwise
            *conv_bn_relu(128, 256, 1),
            *conv_bn_relu(256, 256, 3, (2, 1), groups=256),  # 2 x 32, depthwise
            *conv_bn_relu(256, 256, 1),
            nn.MaxPool2d((2, 1)),  # 1 x 32
        )
        self.neck = nn.Sequential(
            *conv_bn_relu(256, NECK, 1),
            *conv_bn_relu(NECK, NECK, (1, 5), groups=NECK),  # context along the line
            *conv_bn_relu(NECK, NECK, 1),
        )
        self.head = nn.Linear(NECK, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.neck(self.body(x)).squeeze(2)  # batch, NECK, 32
        return self.head(features.transpose(1, 2))


def scores(logits: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> tuple[float, float]:
    """(character accuracy 1 - sum(edit distance) / sum(reference length), exact line accuracy)."""
    decoded = greedy_decode(logits)
    truth = [row[:n].tolist() for row, n in zip(labels, lengths)]
    errors = sum(edit_distance(d, t) for d, t in zip(decoded, truth))
    exact = sum(d == t for d, t in zip(decoded, truth))
    return 1.0 - errors / int(lengths.sum()), exact / len(truth)


def train(model: nn.Module, tokens: list[str], fonts: list[ImageFont.FreeTypeFont]) -> float:
    """AdamW, one-cycle schedule, CTC; every batch is freshly rendered (seeded), so no image repeats.

    Returns the final smoothed CTC loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=STEPS, pct_start=0.15)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    model.train()
    loss_avg = 0.0
    for step in range(STEPS):
        lines, images = training_batch(tokens, step, fonts)
        targets = torch.tensor([c for line in lines for c in encode(line)], dtype=torch.long)
        target_lengths = torch.tensor([len(line) for line in lines], dtype=torch.long)
        log_probs = model(torch.from_numpy(images)).log_softmax(-1).transpose(0, 1)  # time, batch, class
        input_lengths = torch.full((BATCH,), log_probs.shape[0], dtype=torch.long)
        loss = ctc(log_probs, targets, input_lengths, target_lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_avg = 0.9 * loss_avg + 0.1 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1}/{STEPS}: CTC loss {loss_avg:.3f}", flush=True)
    model.eval()
    return loss_avg


def train_seeded(tokens: list[str], fonts) -> tuple[nn.Module, float, float]:
    """Train from a fixed seed on one thread without leaking RNG, thread or determinism settings."""
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            model = Recognizer()
            start = time.perf_counter()
            loss = train(model, tokens, fonts)
            return model, time.perf_counter() - start, loss
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(threads)


def export(model: nn.Module, path: Path) -> None:
    # The TorchScript exporter (dynamo=False) folds each BatchNorm into its Conv, as deployed models have it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, HEIGHT, WIDTH),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": images})[0]


def build(out_dir: Path) -> dict:
    train_tokens, eval_tokens = collect_tokens()
    print(f"  {len(train_tokens)} training and {len(eval_tokens)} held-out docstring tokens", flush=True)
    fonts = load_fonts()
    calib_batches = [training_batch(train_tokens, step, fonts) for step in range(N_CALIB // BATCH)]
    calib_lines = [line for lines, _ in calib_batches for line in lines]
    calib = np.concatenate([images for _, images in calib_batches])  # the first training batches
    eval_lines, evals = render_set(eval_tokens, N_EVAL, SEED + 1, fonts)
    labels, lengths = pad_labels(eval_lines)

    print(f"  training {STEPS} steps of {BATCH} rendered lines", flush=True)
    model, train_seconds, loss = train_seeded(train_tokens, fonts)
    with torch.no_grad():
        reference = model(torch.from_numpy(evals)).numpy()
    torch_char, torch_line = scores(reference, labels, lengths)
    print(f"  trained in {train_seconds:.1f}s, torch held-out character accuracy {torch_char:.4f}",
          flush=True)

    model_path = out_dir / "model.onnx"
    export(model, model_path)
    np.savez(out_dir / "eval.npz", input=evals, labels=labels, label_lengths=lengths)
    np.savez(out_dir / "calib.npz", input=calib)
    (out_dir / "eval.txt").write_text("\n".join(eval_lines) + "\n")
    (out_dir / "calib.txt").write_text("\n".join(calib_lines) + "\n")
    logits = onnx_logits(model_path, evals)
    max_diff = float(np.abs(logits - reference).max())
    if max_diff > 1e-3 * max(1.0, float(np.abs(reference).max())):
        raise RuntimeError(f"ONNX export disagrees with torch: max abs logit difference {max_diff}")
    char_acc, line_acc = scores(logits, labels, lengths)
    print(f"  onnxruntime held-out character accuracy {char_acc:.4f}, line accuracy {line_acc:.4f} "
          f"on {N_EVAL} lines", flush=True)
    return {
        "char_accuracy": char_acc,
        "line_accuracy": line_acc,
        "torch_char_accuracy": torch_char,
        "torch_line_accuracy": torch_line,
        "n_eval": N_EVAL,
        "n_calib": N_CALIB,
        "n_train_lines": STEPS * BATCH,
        "train_seconds": round(train_seconds, 1),
        "final_ctc_loss": round(loss, 4),
        "max_abs_diff_onnx_torch": max_diff,
        "alphabet": ALPHABET,
        "blank": 0,
        "fonts": list(FONTS),
        "n_params": sum(p.numel() for p in model.parameters()),
        "inputs": {"input": ["batch", 1, HEIGHT, WIDTH]},
        "outputs": {"logits": ["batch", WIDTH // 4, N_CLASSES]},
    }
