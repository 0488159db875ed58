"""Official release folders (Med3DVLM ``vlm_qwen``, M3D-LaMed ``lamed_phi3`` / ``lamed_llama``).

Small folders are written here in the official layout: the official tensor names (written out by
hand below, not taken from the loader), sharded safetensors with ``model.safetensors.index.json``,
the official config fields, and a tokenizer with ``<im_patch>``. They must load with no remote code
and compute exactly what the same weights compute in a model built directly.
"""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, Phi3Config, PreTrainedTokenizerFast, Qwen2Config

import med3dvlm
import med3dvlm.checkpoints
from med3dvlm.convert import convert
from med3dvlm.errors import ModelError
from med3dvlm.inspect_model import describe_model, format_description
from med3dvlm.loading import load_bundle
from med3dvlm.models.dcformer import DCFormerConfig
from med3dvlm.models.m3d_lamed import M3DLaMed, M3DLaMedConfig, PoolingProjector, PoolingProjectorConfig, ViT3DConfig
from med3dvlm.models.projector import ProjectorConfig
from med3dvlm.models.vlm import Med3DVLM, Med3DVLMConfig
from med3dvlm.official import folder_kind, is_official_folder, load_official
from med3dvlm.prompts import report_prompt, vqa_prompt
from med3dvlm.quantization import quantizable_layers

TEXTS = ["Describe the findings of the medical image you see.", "The liver shows a hypodense lesion.",
         "Is there a cyst in the left kidney?", "No focal lesion; the spleen is normal."] * 4
# Official name prefix for each of our module prefixes (the released layout).
OFFICIAL_PREFIX = {"vision_tower.": "model.vision_tower.vision_tower.", "mm_projector.": "model.mm_projector.",
                   "language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
QWEN_INPUT = (16, 32, 32)  # (D, H, W): DCFormer-small stages 3 and 4 give one token each
VIT = dict(image_size=(8, 32, 32), patch_size=(2, 8, 8), hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)


def make_tokenizer(folder, bos: bool, tokenizer_class: str):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 1)])
    # Like Llama / Phi-3 releases: a BOS, an unk and no pad token; like Qwen: no BOS, pad = end of text.
    special = dict(bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>") if bos else \
        dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=["<im_patch>"], **special)
    tokenizer.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": tokenizer_class}))
    return tokenizer


def randomized(model):
    """Weights with no zeros or ones anywhere (layer scales, norms, BatchNorm statistics all count)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn_like(tensor)).abs_() if "running_var" in name else \
                    tensor.add_(0.02 * torch.randn_like(tensor))
                if name.endswith(".scale"):
                    tensor.fill_(0.5).add_(0.1 * torch.randn_like(tensor))
    return model.eval()


def write_official(folder, model, config_fields: dict, extra_tensors=None, shards=3):
    """Writes ``model`` in the official layout: config.json + sharded safetensors + index."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        prefix = next(p for p in OFFICIAL_PREFIX if name.startswith(p))
        tensors[OFFICIAL_PREFIX[prefix] + name[len(prefix):]] = tensor.contiguous().clone()
    tensors.update(extra_tensors or {})
    names = sorted(tensors)
    chunks = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks, 1):
        file = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {**model.config.text_config.to_dict(), **config_fields}
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.fixture(scope="module")
def qwen_release(tmp_path_factory):
    """(folder, reference model, tokenizer) of a small official Med3DVLM release."""
    folder = tmp_path_factory.mktemp("Med3DVLM-Qwen")
    tokenizer = make_tokenizer(folder, bos=False, tokenizer_class="Qwen2Tokenizer")
    vision = DCFormerConfig.preset("small", QWEN_INPUT)
    projector = ProjectorConfig.for_encoder(vision, 64, low_output_size=(6, 4), high_output_size=(3, 4))
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    config = Med3DVLMConfig(text, vision, projector, image_token_id=tokenizer.convert_tokens_to_ids("<im_patch>"))
    model = randomized(Med3DVLM(config))
    write_official(folder, model, {
        "model_type": "vlm_qwen", "architectures": ["VLMQwenForCausalLM"], "vision_tower": "dcformer",
        "input_size": [32, 32, 16], "vision_select_layer": -2, "vision_select_feature": "cls_patch",
        "mm_projector_type": "mixer", "mm_mlp_depth": 2, "proj_out_num": 8, "low_output_size": [6, 4],
        "high_output_size": [3, 4], "low_input_size": [1, 384], "high_input_size": [1, 768],
        "mm_hidden_size": 768, "dim": 768, "depth": 12, "patch_size": [16, 16, 16], "use_cache": False,
        "torch_dtype": "float32"})
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 20,
                                                               "repetition_penalty": 1.05}))
    return folder, model, tokenizer


def m3d_release(folder, lm: str):
    """(folder, reference model, tokenizer) of a small official M3D-LaMed release with a SegVol head."""
    tokenizer = make_tokenizer(folder, bos=True, tokenizer_class="PreTrainedTokenizerFast")
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text = Phi3Config(**common, original_max_position_embeddings=512) if lm == "phi3" else LlamaConfig(**common)
    vision = ViT3DConfig(**VIT)
    projector = PoolingProjectorConfig(grid=vision.grid, in_dim=32, out_dim=64)
    config = M3DLaMedConfig(text, vision, projector, image_token_id=tokenizer.convert_tokens_to_ids("<im_patch>"))
    model = randomized(M3DLaMed(config))
    segmentation = {"model.seg_module.image_encoder.weight": torch.randn(8, 4),
                    "model.seg_projector.0.weight": torch.randn(64, 64)}
    write_official(folder, model, {
        "model_type": f"lamed_{lm}", "architectures": [f"Lamed{'Phi3' if lm == 'phi3' else 'Llama'}ForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling.LamedForCausalLM"},
        "image_channel": 1, "image_size": list(VIT["image_size"]), "patch_size": list(VIT["patch_size"]),
        "vision_tower": "vit3d", "vision_select_layer": -1, "vision_select_feature": "patch",
        "mm_hidden_size": 32, "mm_projector_type": "spp", "proj_layer_type": "mlp", "proj_layer_num": 2,
        "proj_pooling_type": "spatial", "proj_pooling_size": 2, "segmentation_module": "segvol",
        "seg_token_id": 5, "vit_num_layers": 2, "vit_num_heads": 4, "vit_mlp_dim": 64}, segmentation, shards=2)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def phi3_release(tmp_path_factory):
    return m3d_release(tmp_path_factory.mktemp("M3D-LaMed-Phi-3"), "phi3")


@pytest.fixture
def broken(phi3_release, tmp_path):
    """A private copy of the small Phi-3 release, to damage."""
    return shutil.copytree(phi3_release[0], tmp_path / "release")


def logits(model, tokenizer, pixels, prompt):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, pixels=pixels).logits


def official_embeds(model, ids, image_tokens):
    """The official insertion: cat(embeds[:, :1], image, embeds[:, N + 1:])."""
    embeds = model.language_model.get_input_embeddings()(ids)
    return torch.cat([embeds[:, :1], image_tokens, embeds[:, image_tokens.shape[1] + 1:]], dim=1)


def test_med3dvlm_release_loads_and_computes_exactly(qwen_release):
    folder, reference, tokenizer = qwen_release
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert {"model.vision_tower.vision_tower.encoder.s0.0.0.c1.0.weight", "lm_head.weight",
            "model.mm_projector.low_mixer.0.mlp1.mm_projector.1.1.weight",
            "model.layers.1.self_attn.q_proj.bias"} <= set(index)
    assert is_official_folder(folder) and folder_kind(folder) == "official-med3dvlm"

    model, loaded_tokenizer = load_official(folder)
    assert type(model) is Med3DVLM and model.config.prompt_style == "med3dvlm"
    assert model.config.vision_config.input_size == QWEN_INPUT and model.config.num_image_tokens == 8
    assert model.language_model.generation_config.top_k == 20  # the folder's generation defaults apply
    assert model.config.text_config.use_cache
    ours = model.state_dict()
    assert all(torch.equal(ours[name], t) for name, t in reference.state_dict().items())
    pixels = torch.rand(1, 1, *QWEN_INPUT, generator=torch.Generator().manual_seed(3))
    prompt = report_prompt(8, "Describe the findings of the medical image you see.")
    assert torch.equal(logits(model, loaded_tokenizer, pixels, prompt), logits(reference, tokenizer, pixels, prompt))
    # No BOS with this tokenizer: the image lands at positions 1..N, as the official code puts it.
    ids = loaded_tokenizer(vqa_prompt(8, "Is there a cyst?"), return_tensors="pt")["input_ids"]
    image = model.encode_images(pixels)
    assert torch.equal(model.build_inputs_embeds(ids, image), official_embeds(model, ids, image))


def as_vocab_and_merges(folder):
    """The folder's tokenizer in the files Qwen2's slow tokenizer saves, as the Med3DVLM release has it:
    vocab.json, merges.txt, added_tokens.json, special_tokens_map.json, the added tokens in
    tokenizer_config.json, and no tokenizer.json."""
    fast = json.loads((folder / "tokenizer.json").read_text())
    (folder / "vocab.json").write_text(json.dumps(fast["model"]["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in fast["model"]["merges"]))
    added = {t["content"]: t["id"] for t in fast["added_tokens"] if t["content"] not in fast["model"]["vocab"]}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(t.pop("id")): t for t in fast["added_tokens"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "additional_special_tokens": ["<im_patch>"]}))
    (folder / "tokenizer.json").unlink()
    return folder


def test_med3dvlm_release_with_vocab_and_merges_only_gives_the_same_ids_and_text(qwen_release, tmp_path):
    folder = qwen_release[0]
    slow = as_vocab_and_merges(shutil.copytree(folder, tmp_path / "release"))
    assert {"vocab.json", "merges.txt"} <= {p.name for p in slow.iterdir()} and not (slow / "tokenizer.json").exists()
    fast_pipe, slow_pipe = (med3dvlm.load(f, device="cpu", dtype="float32") for f in (folder, slow))
    for prompt in (report_prompt(8), vqa_prompt(8, "Is there a cyst in the left kidney? 12 mm, (left)")):
        assert slow_pipe.tokenizer(prompt)["input_ids"] == fast_pipe.tokenizer(prompt)["input_ids"]
    every_id = list(range(len(fast_pipe.tokenizer)))  # special tokens (<s>, </s>...) are left out of answers alike
    assert slow_pipe.tokenizer.decode(every_id, skip_special_tokens=True) == \
        fast_pipe.tokenizer.decode(every_id, skip_special_tokens=True)
    volume = (np.random.default_rng(0).random((20, 36, 36)).astype(np.float32), np.eye(4))
    answers = []
    for pipe in (fast_pipe, slow_pipe):
        pipe.preprocess_config = replace(pipe.preprocess_config, shape=QWEN_INPUT)  # the tiny encoder's input
        answers.append((pipe.report(volume, max_new_tokens=12), pipe.ask(volume, "Is the liver normal?",
                                                                            max_new_tokens=12)))
    assert answers[0][0] and answers[0][1] and answers[1] == answers[0]  # greedy: the same words


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_med3dvlm_release_loads_quantized_batch_by_batch(qwen_release, mode, monkeypatch):
    pytest.importorskip("bitsandbytes")
    folder, reference, tokenizer = qwen_release
    monkeypatch.setattr(med3dvlm.checkpoints, "BATCH_NUMBERS", 5_000)  # several batches per shard
    model, loaded_tokenizer = load_official(folder, quantization=mode)
    assert quantizable_layers(model) == [] and len(quantizable_layers(reference)) == 2 * 7
    assert type(model.language_model.model.layers[1].mlp.down_proj).__name__ == \
        {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[mode]
    pixels = torch.rand(1, 1, *QWEN_INPUT, generator=torch.Generator().manual_seed(3))
    prompt = report_prompt(8, "Describe the findings of the medical image you see.")
    ours = logits(model, loaded_tokenizer, pixels, prompt).flatten()
    assert torch.corrcoef(torch.stack([ours, logits(reference, tokenizer, pixels, prompt).flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize("lm", ["phi3", "llama"])
def test_m3d_lamed_release_loads_and_computes_exactly(lm, phi3_release, tmp_path):
    folder, reference, tokenizer = phi3_release if lm == "phi3" else m3d_release(tmp_path, lm)
    model, loaded_tokenizer = load_official(folder)
    assert type(model) is M3DLaMed and type(model.language_model).__name__ == f"{lm.title()}ForCausalLM"
    assert model.config.prompt_style == "exact" and model.config.num_image_tokens == 8
    assert loaded_tokenizer.pad_token is not None  # the release has none: unk, as official training set
    ours = model.state_dict()
    assert ours.keys() == reference.state_dict().keys()  # SegVol tensors were left unread
    assert all(torch.equal(ours[name], t) for name, t in reference.state_dict().items())
    pixels = torch.rand(1, 1, *VIT["image_size"], generator=torch.Generator().manual_seed(4))
    prompt = report_prompt(8, "Describe the findings of the medical image you see.")
    assert torch.equal(logits(model, loaded_tokenizer, pixels, prompt), logits(reference, tokenizer, pixels, prompt))
    # The tokenizer adds a BOS: the image covers the placeholders at 1..N, as the official code puts it.
    ids = loaded_tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == loaded_tokenizer.bos_token_id
    image = model.encode_images(pixels)
    assert torch.equal(model.build_inputs_embeds(ids, image), official_embeds(model, ids, image))


def reference_m3d_image_tokens(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    """The official encoder + projector for one image, written out with explicit loops: MONAI 1.3's
    perceptron patches ``b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)``, class token first,
    pre-norm blocks with a fused qkv laid out (3, heads, head_dim), final norm, class token dropped,
    2x2x2 average pooling of the patch grid, then Linear-GELU-Linear."""
    vit = {k.removeprefix("vision_tower."): v for k, v in state.items() if k.startswith("vision_tower.")}
    (pd, ph, pw), heads = VIT["patch_size"], VIT["num_heads"]
    grid = [s // p for s, p in zip(VIT["image_size"], VIT["patch_size"])]
    patches = [pixels[0, :, a * pd:(a + 1) * pd, b * ph:(b + 1) * ph, c * pw:(c + 1) * pw]
               .permute(1, 2, 3, 0).reshape(-1)  # (p1 p2 p3 c)
               for a in range(grid[0]) for b in range(grid[1]) for c in range(grid[2])]
    x = F.linear(torch.stack(patches), vit["patch_embedding.patch_embeddings.1.weight"],
                 vit["patch_embedding.patch_embeddings.1.bias"]) + vit["patch_embedding.position_embeddings"][0]
    x = torch.cat([vit["cls_token"][0], x])
    width = x.shape[1]
    norm = lambda t, name: F.layer_norm(t, (width,), vit[f"{name}.weight"], vit[f"{name}.bias"])  # noqa: E731
    for i in range(VIT["num_layers"]):
        p = f"blocks.{i}."
        qkv = (norm(x, p + "norm1") @ vit[p + "attn.qkv.weight"].T).reshape(len(x), 3, heads, width // heads)
        q, k, v = (qkv[:, j].transpose(0, 1) for j in range(3))
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(width // heads), dim=-1)
        x = x + F.linear((attention @ v).transpose(0, 1).reshape(len(x), width),
                         vit[p + "attn.out_proj.weight"], vit[p + "attn.out_proj.bias"])
        hidden = F.gelu(F.linear(norm(x, p + "norm2"), vit[p + "mlp.linear1.weight"], vit[p + "mlp.linear1.bias"]))
        x = x + F.linear(hidden, vit[p + "mlp.linear2.weight"], vit[p + "mlp.linear2.bias"])
    x = norm(x, "norm")[1:].reshape(*grid, width)
    pooled = torch.stack([x[a:a + 2, b:b + 2, c:c + 2].mean(dim=(0, 1, 2)) for a in range(0, grid[0], 2)
                          for b in range(0, grid[1], 2) for c in range(0, grid[2], 2)])
    hidden = F.gelu(F.linear(pooled, state["mm_projector.projector.0.weight"], state["mm_projector.projector.0.bias"]))
    return F.linear(hidden, state["mm_projector.projector.2.weight"], state["mm_projector.projector.2.bias"])


def test_m3d_lamed_image_path_is_the_official_computation(phi3_release):
    _, reference, _ = phi3_release
    pixels = torch.rand(1, 1, *VIT["image_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference_m3d_image_tokens(reference.state_dict(), pixels)
        torch.testing.assert_close(reference.encode_images(pixels)[0], expected, rtol=1e-4, atol=1e-5)


def test_pooling_projector_sequence_pooling_and_linear_layers():
    config = PoolingProjectorConfig(grid=(2, 4, 4), in_dim=4, out_dim=6, pooling_type="sequence",
                                    layer_type="linear", layer_num=2)
    projector = PoolingProjector(config)
    assert list(projector.state_dict()) == ["projector.0.weight", "projector.0.bias",
                                            "projector.1.weight", "projector.1.bias"]  # no GELU slot
    x = torch.randn(1, 32, 4)
    with torch.no_grad():  # official: average each run of pooling_size**3 = 8 consecutive tokens
        expected = projector.projector[1](projector.projector[0](x.reshape(1, 4, 8, 4).mean(2)))
        assert config.num_tokens == 4
        torch.testing.assert_close(projector(x), expected)


def test_describe_model_counts_from_headers(qwen_release, phi3_release):
    folder, reference, _ = qwen_release
    info = describe_model(folder)
    numbers = {name: t.numel() for name, t in reference.state_dict().items()}
    assert info["kind"] == "official-med3dvlm" and info["language_model"] == "qwen2" and info["files"] == 3
    assert info["parameters"] == sum(numbers.values())
    assert info["parts"]["vision encoder"] == sum(n for k, n in numbers.items() if k.startswith("vision_tower."))
    batches = sum(n for k, n in numbers.items() if k.endswith("num_batches_tracked"))  # int64 counters
    floats = info["parameters"] - batches
    memory = info["memory_bytes"]
    assert memory["float32"] == 4 * floats + 8 * batches and memory["bfloat16"] == 2 * floats + 8 * batches
    assert memory["float32"] > memory["float16"] > memory["8-bit"] > memory["4-bit"]
    text = format_description(info)
    assert "official Med3DVLM release" in text and f"{info['parameters']:,}" in text and "4-bit" in text

    m3d = describe_model(phi3_release[0])
    assert m3d["kind"] == "m3d-lamed" and m3d["language_model"] == "phi3"
    assert m3d["ignored"] == 8 * 4 + 64 * 64  # the SegVol tensors, reported and left out
    assert m3d["parameters"] == sum(t.numel() for t in phi3_release[1].state_dict().values())


def test_convert_writes_a_bundle_that_computes_the_same(qwen_release, phi3_release, tmp_path):
    folder, reference, tokenizer = qwen_release
    out = convert(folder, tmp_path / "bundle")
    assert folder_kind(out) == "med3dvlm" and not is_official_folder(out)
    assert describe_model(out)["parameters"] == describe_model(folder)["parameters"]
    model, bundle_tokenizer = load_bundle(out)
    pixels = torch.rand(1, 1, *QWEN_INPUT, generator=torch.Generator().manual_seed(6))
    prompt = report_prompt(8)
    assert torch.equal(logits(model, bundle_tokenizer, pixels, prompt), logits(reference, tokenizer, pixels, prompt))
    with pytest.raises(ModelError, match="already holds a model"):
        convert(folder, out)
    with pytest.raises(ModelError, match="(?i)load the folder directly"):
        convert(phi3_release[0], tmp_path / "m3d")


def shard(folder, number=1):
    return sorted(folder.glob("model-*.safetensors"))[number - 1]


def test_truncated_or_garbage_shard_is_named(broken):
    path = shard(broken)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelError, match=f"{path.name}.*corrupted or truncated"):
        load_official(broken)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match=f"{path.name}.*corrupted or truncated"):
        describe_model(broken)


def test_missing_shard_is_named(broken):
    path = shard(broken, 2)
    path.unlink()
    with pytest.raises(ModelError, match=f"{path.name} listed in model.safetensors.index.json is missing"):
        load_official(broken)


def test_wrong_shape_missing_and_unexpected_tensors_are_named(broken):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    name = "model.layers.0.self_attn.o_proj.weight"
    moved = "model.vision_tower.vision_tower.cls_token"
    tensors = {name: torch.zeros(64, 48), "model.extra.weight": torch.zeros(2)}
    save_file(tensors, str(broken / "patch.safetensors"))
    weight_map.update(dict.fromkeys(tensors, "patch.safetensors"))
    del weight_map[moved]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as error:
        load_official(broken)
    message = str(error.value)
    assert f"{name} (64, 48) in file vs (64, 64) in model" in message
    assert f"1 missing ({moved})" in message and "1 unexpected (model.extra.weight)" in message


def test_pickled_weights_need_opt_in(broken, phi3_release):
    tensors = {}
    for file in broken.glob("model-*.safetensors"):
        tensors.update(load_file(str(file)))
        file.unlink()
    (broken / "model.safetensors.index.json").unlink()
    torch.save(tensors, broken / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled.*allow_pickle=True"):
        load_official(broken)
    model, _ = load_official(broken, allow_pickle=True, dtype=torch.bfloat16)
    reference = phi3_release[1].state_dict()
    assert all(torch.equal(t, reference[n].to(t.dtype)) for n, t in model.state_dict().items())
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16


def test_tokenizer_without_image_token_and_unsupported_settings(broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(ModelError, match="mm_projector_type='linear'.*'spp' only"):
        load_official(broken)
    path = broken / "tokenizer.json"
    path.write_text(path.read_text().replace("<im_patch>", "<image>"))
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ModelError, match="no single <im_patch> token"):
        load_official(broken)
