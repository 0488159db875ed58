"""The pipeline with the shipped demo model: report, chat, cancel, encode once, batch, errors."""

import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import med3dvlm
import med3dvlm.prompts
from med3dvlm.cancel import CancelToken
from med3dvlm.data.phantoms import make_ct_phantom
from med3dvlm.data.questions import closed_questions
from med3dvlm.data.reports import mentioned_findings
from med3dvlm.errors import Med3DVLMError, ModelError, VolumeError
from med3dvlm.pipeline import ContextWarning, _friendly_oom
from med3dvlm.resources import demo_model_dir, sample_path

SAMPLE = sample_path("ct_phantom.nii.gz")
# Known gap (issue 24): the shipped demo answers "Which organ contains the ...?" for 87 % of 100
# unseen phantoms (seed 12345) but for 24 of the 31 these 40 phantoms ask (0.77). The test states
# what it must do; strict, so that it fails loudly (XPASS) once a retrained demo model passes.
NOT_YET_ACCURATE = pytest.mark.xfail(strict=True, reason="the demo's language model does not yet read its tokens (issue 24)")


@pytest.fixture(scope="module")
def pipe():
    return med3dvlm.load("demo", device="cpu")


@pytest.fixture(scope="module")
def phantom():
    return make_ct_phantom(987_654, n_findings=1)  # a seed far from the training seeds


def count_encoder_calls(pipe):
    calls = []
    handle = pipe.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_report_on_sample_names_its_findings(pipe):
    report = pipe.report(SAMPLE)
    truth = {(f["organ"], f["kind"]) for f in
             __import__("json").loads(sample_path("ct_phantom_truth.json").read_text())["findings"]}
    assert "Findings" in report or "findings" in report
    assert truth & mentioned_findings(report), report


def test_report_streams_the_same_text_as_returned(pipe, phantom):
    pieces = []
    text = pipe.report(phantom.volume, on_token=pieces.append)
    assert len(pieces) > 5
    assert "".join(pieces).strip() == text


def test_demo_reads_the_contrast_phase_of_fresh_phantoms(pipe):
    """The image decides the answer: both phases, in the open answer and in the report's technique line."""
    phantoms = [make_ct_phantom(seed) for seed in range(640_000, 640_006)]
    assert {p.truth.phase for p in phantoms} == {"non-contrast", "portal venous"}
    for p in phantoms:
        answer = pipe.ask(p.volume, "What is the contrast phase of this CT scan?", do_sample=False)
        technique = pipe.report(p.volume, do_sample=False, max_new_tokens=24)
        assert p.truth.phase.split()[0] in answer.lower(), (p.truth.phase, answer)
        assert p.truth.phase in technique.lower(), (p.truth.phase, technique)


def _closed_accuracy(pipe, question_filter, seeds) -> float:
    """Share of the matching closed questions about fresh phantoms that the demo answers right."""
    right = []
    for seed in seeds:
        p = make_ct_phantom(seed)
        for q in filter(question_filter, closed_questions(p.truth, np.random.default_rng(seed))):
            right.append(pipe.ask(p.volume, q["question"], choices=q["choices"]) == f"{q['answer_choice']}. {q['answer']}")
    assert len(right) >= 8
    return float(np.mean(right))


def test_closed_phase_questions_on_fresh_phantoms(pipe):
    # Four choices (two of them phases the phantoms never have); 40 questions gave 80 %.
    assert _closed_accuracy(pipe, lambda q: q["type"] == 2, range(650_000, 650_012)) >= 0.65


@NOT_YET_ACCURATE
def test_closed_organ_questions_on_fresh_phantoms(pipe):
    # 40 phantoms: one in three has a kind found once (the question's condition); 12 asked it 5 times
    assert _closed_accuracy(pipe, lambda q: q["question"].startswith("Which organ"), range(650_000, 650_040)) >= 0.8


def test_follow_up_question_does_not_run_the_encoder_again(pipe, phantom):
    pipe._tokens.clear()
    calls, handle = count_encoder_calls(pipe)
    try:
        first = pipe.ask(phantom.volume, "What abnormalities are present?")
        pipe.ask(phantom.volume, "How many abnormalities are there?", history=[("What abnormalities are present?", first)])
        pipe.report(phantom.volume)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_history_reaches_the_model(pipe, phantom):
    """A second turn is conditioned on the first: the prompt grows and the next-token scores change."""
    image_tokens = pipe.encode(phantom.volume)
    question = "How large is it?"
    logits = []
    for history in ([], [("What abnormality is seen in the liver?", "Cyst")]):
        prompt = med3dvlm.prompts.vqa_prompt(pipe.num_image_tokens, question, history)
        batch = pipe._tokenize([prompt])
        with torch.no_grad():
            logits.append(pipe.model(image_tokens=image_tokens, **batch).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_cancel_stops_within_one_step(pipe, phantom):
    token, pieces = CancelToken(), []

    def on_token(piece):
        pieces.append(piece)
        token.cancel()

    text = pipe.report(phantom.volume, on_token=on_token, cancel=token, max_new_tokens=200)
    assert len(pieces) <= 2
    assert len(pipe.tokenizer(text)["input_ids"]) <= 3


def test_streamed_pieces_add_up_to_the_returned_answer(pipe, phantom):
    """What a user watches stream (CLI, chat panel) is exactly the answer returned: no leading space."""
    pieces: list[str] = []
    answer = pipe.ask(phantom.volume, "What abnormalities are present?", on_token=pieces.append)
    assert pieces and "".join(pieces) == answer == answer.strip()


def test_stream_iterator_stops_generation_when_consumer_stops(pipe, phantom):
    stream = pipe.stream_report(phantom.volume)
    first = next(stream)
    stream.close()  # the worker thread is told to cancel and joined
    assert first


def test_batch_equals_one_by_one(pipe):
    volumes = [make_ct_phantom(seed).volume for seed in (11, 12, 13)]
    batch = pipe.report_batch(volumes, batch_size=3, max_new_tokens=60)
    single = [pipe.report(v, max_new_tokens=60) for v in volumes]
    assert batch == single


def test_retrieval_ranks_the_true_report_first(pipe):
    phantoms = [make_ct_phantom(seed, n_findings=1) for seed in (21, 22, 23, 24)]
    from med3dvlm.data.reports import write_report

    reports = [write_report(p.truth, np.random.default_rng(0)) for p in phantoms]
    hits = sum(pipe.retrieve(p.volume, reports)[0][0] == i for i, p in enumerate(phantoms))
    assert hits >= 2


# ----- errors a user can act on ---------------------------------------------------------------------
def test_unknown_model_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        med3dvlm.load(tmp_path / "nope")


def test_incompatible_weights_name_the_keys(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(demo_model_dir(), folder)
    tensors = load_file(folder / "model.safetensors")
    removed = next(k for k in tensors if k.startswith("mm_projector."))
    del tensors[removed]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelError, match="missing") as info:
        med3dvlm.load(folder)
    assert removed in str(info.value)


def test_volume_refused_by_validation(pipe):
    flat = (np.random.default_rng(0).normal(size=(64, 64, 1)) * 100).astype(np.int16)
    with pytest.raises(VolumeError, match="2D"):
        pipe.report((flat, np.eye(4)))


def test_empty_question(pipe, phantom):
    with pytest.raises(Med3DVLMError, match="empty"):
        pipe.ask(phantom.volume, "   ")


def test_long_history_is_truncated_with_a_warning(pipe, phantom):
    turn = ("Describe every organ in great detail please. " * 8, "The liver is normal. " * 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answer = pipe.ask(phantom.volume, "How many abnormalities are there?", history=[turn] * 20)
    assert any(issubclass(w.category, ContextWarning) for w in caught)
    assert answer


def test_question_longer_than_the_context(pipe, phantom):
    with pytest.raises(Med3DVLMError, match="too long"):
        pipe.ask(phantom.volume, "why " * 2000)


def test_out_of_gpu_memory_suggests_what_to_do():
    with pytest.raises(ModelError, match="float16.*cpu"):
        with _friendly_oom("generating text"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")


def test_mri_detection_scores_every_label_of_the_mr_sample(pipe):
    result = pipe.detect(sample_path("mr_phantom_t2.nii.gz"))
    scores = dict(result)  # reads as {label: probability}, highest first
    assert result.sequences == ("T2",) and len(scores) == len(result.scores) >= 20
    assert list(scores.values()) == sorted(scores.values(), reverse=True)
    assert all(0.0 <= p <= 1.0 for p in scores.values())


def test_detection_refuses_ct(pipe):
    with pytest.raises(VolumeError, match="CT volume"):
        pipe.detect(SAMPLE)


def test_a_follow_up_about_a_file_does_not_read_it_again(monkeypatch, tmp_path):
    import med3dvlm.readers as readers

    pipe = med3dvlm.load("demo", device="cpu")
    path = tmp_path / "ct.nii.gz"
    shutil.copy(sample_path("ct_phantom.nii.gz"), path)
    reads = []
    real_read = readers.read_volume
    monkeypatch.setattr(readers, "read_volume", lambda p: reads.append(p) or real_read(p))
    first = pipe.ask(path, "Is there a cyst?")
    assert pipe.ask(path, "Is there a cyst?") == first and len(reads) == 1
    made = pipe.provenance("ask", path)
    assert len(reads) == 1 and made["preprocessing"]["volumes"][0]["steps"][-1].endswith("-> 32 x 128 x 128")
    path.write_bytes(sample_path("mr_phantom_t2.nii.gz").read_bytes())  # a new file at the same path
    pipe.ask(path, "Is there a cyst?")
    assert len(reads) == 2


def test_a_texts_retrieval_score_does_not_depend_on_the_other_texts(pipe, phantom):
    """The shared tokenizer pads on the left for generation; the text tower's must not shift."""
    short, long = "No abnormality.", "Findings: " + "The liver is unremarkable. " * 8
    alone = pipe.similarities([phantom.volume], [short])[0, 0]
    together = pipe.similarities([phantom.volume], [short, long])[0, 0]
    assert torch.allclose(alone, together, atol=1e-5)


def test_retrieval_over_many_volumes_is_embedded_in_batches_without_a_graph(pipe, phantom):
    """Phantom evaluation ranks every volume against every report: all at once, 200 took ~15 GB."""
    volumes, texts = [phantom.volume] * 3, ["No abnormality.", "A cyst in the liver.", "Fluid."]
    in_batches = pipe.similarities(volumes, texts, batch_size=2)
    assert torch.allclose(in_batches, pipe.similarities(volumes, texts), atol=1e-5)
    assert in_batches.shape == (3, 3) and not in_batches.requires_grad
    # the probability SigLIP was trained to give (its own logits t cos + b), not the sigmoid of the cosine
    text = pipe.tokenizer([texts[1]], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        logits = pipe.retrieval(pipe.pixels(phantom.volume), text["input_ids"], text["attention_mask"])["logits"]
    assert in_batches[0, 1].item() == pytest.approx(torch.sigmoid(logits)[0, 0].item(), abs=1e-5)
