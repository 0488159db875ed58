"""4-bit and 8-bit loading of the demo model with bitsandbytes, on the CPU: which layers are
quantized, how much memory their weights take, and how close the answers stay to the float model."""

from importlib.metadata import PackageNotFoundError

import pytest
import torch
from torch import nn

import med3dvlm
import med3dvlm.checkpoints
import med3dvlm.quantization
from med3dvlm import prompts
from med3dvlm.cli import main
from med3dvlm.errors import Med3DVLMError
from med3dvlm.models.vlm import Med3DVLM
from med3dvlm.quantization import quantizable_layers, quantized_bytes
from med3dvlm.resources import demo_model_dir, sample_path

SAMPLE = sample_path("ct_phantom.nii.gz")
MODES = ["8bit", "4bit"]
# Questions of the kinds the demo was trained on: "What is the imaging modality?" with X-ray among the
# choices put two absurd answers 0.07 apart, a tie 4-bit rounding may break either way.
CLOSED = [("Which organ has an abnormality?", ["Liver", "Spleen", "Left kidney", "Right kidney"]),
          ("How many abnormalities are seen in this scan?", ["None", "One", "Two", "Three"]),
          ("Is there a cyst in the liver?", ["Yes", "No"]),
          ("In which phase was this CT image acquired?",
           ["Non-contrast", "Portal venous phase", "Arterial phase", "Delayed phase"]),
          ("Which organ contains the cyst?", ["Liver", "Spleen", "Pancreas", "Left kidney"]),
          ("Is the spleen enlarged?", ["Yes", "No"])]
# Logits on a VQA prompt must correlate at least this well with the float model's (the December 2026
# demo at 4 bits: 0.998, its answers unchanged).
MIN_CORRELATION = {"8bit": 0.9999, "4bit": 0.995}
# The decoder's weights (norms and biases included) must shrink at least this much from float32.
MIN_SHRINK = {"8bit": 3.8, "4bit": 7.0}


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def quantized_weight_bytes(layer: nn.Module) -> int:
    """The codes and scales of a bitsandbytes layer's weight, as it holds them after loading."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return nbytes(layer.weight) + nbytes(scales)
    state = layer.weight.quant_state
    return nbytes(layer.weight) + nbytes(state.absmax) + (nbytes(state.state2.absmax) if state.nested else 0)


def decoder_bytes(model: Med3DVLM) -> int:
    return sum(nbytes(t) for t in model.language_model.model.layers.state_dict().values())


@pytest.fixture(scope="module")
def float_pipe():
    return med3dvlm.load("demo", device="cpu")


@pytest.fixture(scope="module", params=MODES)
def quantized(request):
    pytest.importorskip("bitsandbytes")
    return request.param, med3dvlm.load("demo", device="cpu", quantization=request.param)


# ----- what cannot run is refused with what to do --------------------------------------------------

def test_unknown_mode_and_unsupported_device_are_refused():
    with pytest.raises(Med3DVLMError, match="Unknown quantization '3bit'"):
        med3dvlm.load("demo", device="cpu", quantization="3bit")
    with pytest.raises(Med3DVLMError, match="CUDA GPU or the CPU, not on mps.*device='cpu'"):
        med3dvlm.load("demo", device="mps", quantization="4bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_suggests_the_cpu():
    with pytest.raises(Med3DVLMError, match="needs a CUDA GPU.*device='cpu'"):
        med3dvlm.load("demo", device="cuda", quantization="8bit")


def test_missing_or_old_bitsandbytes_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(med3dvlm.quantization, "version", not_installed)
    with pytest.raises(Med3DVLMError, match=r"needs the bitsandbytes package: pip install 'bitsandbytes>=0.46'\."):
        med3dvlm.load("demo", device="cpu", quantization="4bit")
    monkeypatch.setenv("MED3DVLM_HOST", "slicer")  # the Slicer module's server: Slicer's own installer
    with pytest.raises(Med3DVLMError, match=r"console with slicer.util.pip_install\('bitsandbytes>=0.46'\) and restart"):
        med3dvlm.load("demo", device="cpu", quantization="4bit")
    monkeypatch.delenv("MED3DVLM_HOST")
    monkeypatch.setattr(med3dvlm.quantization, "version", lambda name: "0.45.5")
    with pytest.raises(Med3DVLMError, match=r"bitsandbytes 0.46 or newer, but 0.45.5 is installed"):
        med3dvlm.load("demo", device="cpu", quantization="8bit")


# ----- which layers, and their memory ----------------------------------------------------------------

def test_only_the_decoder_linears_are_quantized(quantized, float_pipe):
    import bitsandbytes as bnb

    mode, pipe = quantized
    expected = quantizable_layers(float_pipe.model)
    assert len(expected) == 4 * 7  # the demo LM: 4 layers of q, k, v, o, gate, up, down
    assert quantizable_layers(pipe.model) == []  # no float Linear left in the decoder
    assert (pipe.quantization, float_pipe.quantization) == (mode, None)
    layer_type, code_dtype = {"8bit": (bnb.nn.Linear8bitLt, torch.int8), "4bit": (bnb.nn.Linear4bit, torch.uint8)}[mode]
    for name in expected:
        layer = pipe.model.get_submodule(name)
        assert type(layer) is layer_type and layer.weight.dtype == code_dtype, name
    # Everything else keeps its float dtype: vision tower, projector, embeddings, norms, biases, LM head.
    params = dict(pipe.model.named_parameters())
    kept = {name for name in params if name.removesuffix(".weight") not in expected}
    assert kept == {name for name, _ in float_pipe.model.named_parameters()
                    if name.removesuffix(".weight") not in expected}
    assert {params[name].dtype for name in kept} == {torch.float32}
    lm = pipe.model.language_model
    assert lm.lm_head.weight is lm.get_input_embeddings().weight  # still tied


@pytest.mark.parametrize("mode", MODES)
def test_decoder_memory_shrinks_as_inspect_predicts(mode):
    pytest.importorskip("bitsandbytes")
    full = Med3DVLM.from_pretrained(demo_model_dir())
    small = Med3DVLM.from_pretrained(demo_model_dir(), quantization=mode)  # measured before any forward pass
    names = quantizable_layers(full)
    measured = sum(quantized_weight_bytes(small.get_submodule(name)) for name in names)
    predicted = sum(quantized_bytes(tuple(full.get_submodule(name).weight.shape), mode) for name in names)
    assert measured == predicted  # what `med3dvlm inspect` reports for the 8-bit and 4-bit columns
    assert decoder_bytes(full) / decoder_bytes(small) >= MIN_SHRINK[mode]


@pytest.mark.parametrize("mode", MODES)
def test_layers_are_quantized_as_their_weights_arrive(mode, monkeypatch):
    """With small batches, at most the layer being read is ever in float: the full float decoder of
    a large model would not fit the GPU that its quantized form is meant for."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(med3dvlm.checkpoints, "BATCH_NUMBERS", 40_000)  # about one demo tensor per batch
    real, floats_loaded = med3dvlm.quantization.quantize_loaded, []

    def counting(model, replace):
        floats_loaded.append(sum(not model.get_submodule(name).weight.is_meta for name in quantizable_layers(model)))
        real(model, replace)

    monkeypatch.setattr(med3dvlm.quantization, "quantize_loaded", counting)
    model = Med3DVLM.from_pretrained(demo_model_dir(), quantization=mode)
    assert len(floats_loaded) > 28 and max(floats_loaded) <= 2
    assert quantizable_layers(model) == []


# ----- answers ---------------------------------------------------------------------------------------

def test_closed_answers_match_the_float_model(quantized, float_pipe):
    mode, pipe = quantized
    answers = [pipe.ask(SAMPLE, question, choices=choices) for question, choices in CLOSED]
    assert answers == [float_pipe.ask(SAMPLE, question, choices=choices) for question, choices in CLOSED], mode


def test_logits_correlate_with_the_float_model(quantized, float_pipe):
    mode, pipe = quantized
    prompt = float_pipe._tokenize([prompts.vqa_prompt(float_pipe.num_image_tokens, CLOSED[0][0])])
    with torch.inference_mode():
        ours = pipe.model(image_tokens=pipe.encode(SAMPLE), **prompt).logits.flatten()
        reference = float_pipe.model(image_tokens=float_pipe.encode(SAMPLE), **prompt).logits.flatten()
    assert torch.corrcoef(torch.stack([ours, reference]))[0, 1] >= MIN_CORRELATION[mode]
    assert not torch.equal(ours, reference)  # really a different computation


def test_cli_quantization_option(capsys):
    pytest.importorskip("bitsandbytes")
    question, choices = CLOSED[0]
    assert main(["ask", str(SAMPLE), question, "--choices", *choices, "--device", "cpu"]) == 0
    expected = capsys.readouterr().out
    assert main(["ask", str(SAMPLE), question, "--choices", *choices, "--device", "cpu",
                 "--quantization", "4bit"]) == 0
    assert capsys.readouterr().out == expected
