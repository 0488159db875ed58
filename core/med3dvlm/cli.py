"""`med3dvlm` command line: inspect volumes, make phantoms, report/ask/chat/retrieve, train, evaluate."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import Med3DVLMError
from .eval.detection_cli import add_detection_eval_parser
from .train.commands import add_train_parser

PROBE_FIT_N = 300  # phantoms the evaluation's image-token probe is fitted on


def _add_model_args(p: argparse.ArgumentParser, remote: bool = True) -> None:
    p.add_argument("--model", default="demo", help="'demo' (bundled) or a model folder (default: demo)")
    if remote:
        p.add_argument("--server", metavar="URL", help="use the model server at URL (med3dvlm serve) instead of --model")
        p.add_argument("--token-file", help="file holding the server's access token (default: $MED3DVLM_TOKEN)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16 (default: auto)")
    p.add_argument("--quantization", choices=["4bit", "8bit"], default=None,
                   help="store the language model's decoder in 4-bit (NF4) or 8-bit (LLM.int8) with bitsandbytes "
                        "(pip install 'med3dvlm[quant]'); the rest keeps --dtype (default: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (1 is fastest for small models on a busy CPU)")
    _add_pickle_arg(p)


def _add_pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="permit official .bin weights (loaded with weights_only=True)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deterministic", action="store_true",
                   help="the same text on rerun on this machine (fixed seeds, deterministic kernels)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)


def _add_framing_args(p: argparse.ArgumentParser, window: bool = True) -> None:
    p.add_argument("--region", nargs=6, type=float, metavar=("R0", "A0", "S0", "R1", "A1", "S1"),
                   help="only this box: two opposite corners in RAS mm; the volume is cropped to it (with a "
                        "10 mm margin) before preprocessing, so the model sees it at a higher resolution")
    if window:
        p.add_argument("--window", nargs=2, type=float, metavar=("CENTRE", "WIDTH"),
                       help="show the model this CT window instead of the preset's (the model was trained with "
                            "the preset's)")


def _framing(args) -> dict:
    """The region and window of --region / --window, as the pipeline's keyword arguments."""
    framing = {}
    if getattr(args, "region", None):
        framing["region"] = (tuple(args.region[:3]), tuple(args.region[3:]))
    if getattr(args, "window", None):
        framing["window"] = tuple(args.window)
    return framing


def _settings(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample or None,
            "temperature": args.temperature, "top_p": args.top_p}


def _pipeline(args):
    """The in-process pipeline of --model, or a client of the --server with the same methods."""
    if getattr(args, "deterministic", False):
        if getattr(args, "server", None):  # seeds and kernels here would not reach the server's model
            raise Med3DVLMError("--deterministic applies to a model in this process; "
                                "drop --server or --deterministic.")
        from .provenance import deterministic

        deterministic()
    if getattr(args, "server", None):
        from .client.remote import connect

        return connect(args.server, token=_read_token(args.token_file) if args.token_file else None)
    import torch

    from .pipeline import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                allow_pickle=args.allow_pickle)


def _read_token(path: str) -> str:
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as error:
        raise Med3DVLMError(f"The token file {path} cannot be read ({error.strerror}).") from None


def _progress(total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=total < 2, file=sys.stderr)


def cmd_info(args) -> None:
    from .preprocess import PRESETS, describe
    from .readers import read_volume
    from .volume_info import volume_summary

    for path in args.volumes:
        volume = read_volume(path)
        print(volume_summary(volume))
        print(f"  preprocessing ({args.preset}):")
        for step in describe(volume, PRESETS[args.preset]):
            print(f"    - {step}")


def cmd_phantoms(args) -> None:
    from .data.m3d import write_dataset

    write_dataset(args.outdir, args.n, args.seed, modality=args.modality, progress=True)
    print(f"wrote {args.n} {args.modality} phantoms to {args.outdir}")


def _provenance(pipe, task: str, volume, settings: dict, seconds: float) -> dict:
    """What produced an output (Answerer.provenance), with the time taken unless a server's record
    has its own."""
    return {"seconds": round(seconds, 3), **pipe.provenance(task, volume, **settings)}


def cmd_report(args) -> None:
    from .batch import expand

    volumes = expand(args.volumes)
    settings, framing = _settings(args), _framing(args)
    if args.output_dir:
        if framing:
            raise Med3DVLMError("--region and --window apply to one volume at a time; drop --output-dir.")
        return _report_to_folder(args, volumes, settings)
    pipe = _pipeline(args)
    for volume in volumes:
        started = time.perf_counter()
        if args.format == "json":
            text = pipe.report(volume, **framing, **settings)
            print(json.dumps({"volume": str(volume), "model": pipe.model_name, "report": text,
                              "provenance": _provenance(pipe, "report", volume, {**settings, **framing},
                                                        time.perf_counter() - started)}))
            continue
        if len(volumes) > 1:
            print(f"== {volume}")
        pipe.report(volume, on_token=lambda t: print(t, end="", flush=True), **framing, **settings)
        print()


def _report_to_folder(args, volumes, settings: dict) -> None:
    """One file per volume; under torchrun each rank takes its share (see batch.py)."""
    from .batch import report_shard, write_summary
    from .distributed import barrier, cleanup, init_distributed

    info = init_distributed(None if args.device == "auto" else args.device)
    if info.world_size > 1 and args.device == "auto":
        args.device = str(info.device)  # this rank's own GPU
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe, started = _pipeline(args), time.perf_counter()
    bar = _progress(len(volumes[info.rank::info.world_size]), "volume")
    written, failed, skipped = report_shard(
        pipe, volumes, out, args.format, settings, info.rank, info.world_size,
        lambda volume, seconds: _provenance(pipe, "report", volume, settings, seconds),
        batch_size=1 if args.server else args.batch_size, progress=bar.update)
    bar.close()
    print(f"med3dvlm: rank {info.rank}: {written} reported, {failed} failed, {skipped} done before", file=sys.stderr)
    barrier()
    if info.is_main:
        summary = write_summary(out, volumes, args.format, info.world_size, pipe.model_name,
                                _provenance(pipe, "report", None, settings, time.perf_counter() - started))
        print(f"{summary['reported']} of {summary['volumes']} volumes reported in {out}"
              + (f"; {len(summary['failed'])} failed (see *.failed.json)" if summary["failed"] else ""))
    cleanup()


def cmd_ask(args) -> None:
    framing = _framing(args)
    pipe, settings = _pipeline(args), _settings(args)
    started = time.perf_counter()
    if args.json:
        answer = pipe.ask(args.volume, args.question, choices=args.choices, **framing, **settings)
        print(json.dumps({"volume": str(args.volume), "question": args.question, "answer": answer,
                          "provenance": _provenance(pipe, "ask", args.volume, {**settings, **framing},
                                                    time.perf_counter() - started)}, indent=1))
        return
    pipe.ask(args.volume, args.question, choices=args.choices, on_token=lambda t: print(t, end="", flush=True),
             **framing, **settings)
    print()


def cmd_chat(args) -> None:
    pipe = _pipeline(args)
    print(f"Chatting with {pipe.model_name} about {args.volume}. Empty line or Ctrl-D to quit.", file=sys.stderr)
    pipe.encode(args.volume)
    history: list[tuple[str, str]] = []
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        print("model> ", end="", flush=True)
        answer = pipe.ask(args.volume, question, history=history, on_token=lambda t: print(t, end="", flush=True),
                          **_settings(args))
        print()
        history.append((question, answer))


def cmd_detect(args) -> None:
    from .detection_result import NOT_CALLED
    from .readers import read_volume

    framing = _framing(args)
    pipe = _pipeline(args)
    if args.sequences and len(args.sequences) != len(args.volumes):
        raise Med3DVLMError(f"--sequence names {len(args.sequences)} sequences for {len(args.volumes)} volumes; "
                            "give one per volume, in the same order.")
    started = time.perf_counter()
    volumes = [read_volume(v) for v in args.volumes]  # read once: for the scores and their provenance
    study = dict(zip(args.sequences, volumes)) if args.sequences else volumes
    result = pipe.detect(study, **framing)
    if args.json:
        print(json.dumps({**result.to_dict(), "provenance": _provenance(pipe, "detect", study, framing,
                                                                         time.perf_counter() - started)}, indent=1))
        return
    weights = ", ".join(f"{seq} {w:.2f}" for seq, w in result.sequence_weights.items())
    print(f"MRI study: {', '.join(result.sequences)} (fusion weights: {weights})")
    print(f"{'abnormality':36s} {'probability':>11s} {'threshold':>9s}")
    for score in result.scores:
        cut = f"{score.threshold:9.3f}" if score.called else f"{'-':>9s}"
        flag = "  <- positive" if score.positive else "" if score.called else f"  ({NOT_CALLED})"
        print(f"{score.label:36s} {score.probability:11.3f} {cut}{flag}")


def cmd_retrieve(args) -> None:
    pipe = _pipeline(args)
    # os.path.isfile, not Path.is_file: a report longer than a file name may be raises in the latter
    texts = [Path(t).read_text().strip() if os.path.isfile(t) else t for t in args.texts]
    for rank, (index, score) in enumerate(pipe.retrieve(args.volume, texts), start=1):
        print(f"{rank:>3}  {score:.3f}  {texts[index][:100]}")


def cmd_explain(args) -> None:
    from .readers import read_volume, write_volume

    framing = _framing(args)
    if args.score and (args.question or args.answer or args.choices or "window" in framing):
        raise Med3DVLMError("--score explains an abnormality score: give no question, --answer, --choices or --window.")
    pipe, volume, started = _pipeline(args), read_volume(args.volume), time.perf_counter()
    if args.score:
        (evidence,) = pipe.explain_detection(volume, args.score, framing.get("region"), method=args.method,
                                             samples=args.samples).values()
    else:
        evidence = pipe.explain(volume, args.question, args.answer, choices=args.choices, method=args.method,
                                samples=args.samples, **framing)
    write_volume(evidence.map, args.output)
    if args.json:
        found = {k: v for k, v in evidence.to_dict().items() if k != "preprocessing"}  # in the provenance
        task = "explain-score" if args.score else "explain"
        print(json.dumps({"volume": args.volume, "map": args.output, **found,
                          "provenance": _provenance(pipe, task, volume, framing, time.perf_counter() - started)},
                         indent=1))
        return
    print(f"{evidence.question or 'report'}: {evidence.answer}")
    peak = ", ".join(f"{c:.1f}" for c in evidence.peak_ras)
    print(f"evidence map written to {args.output}; strongest support at RAS ({peak}) mm")


def cmd_view(args) -> None:
    from .model_view import model_view
    from .preprocess import PRESETS
    from .readers import read_volume, write_volume

    if args.preset not in PRESETS:
        raise Med3DVLMError(f"Unknown preset {args.preset!r}; use one of {', '.join(PRESETS)}.")
    view = model_view(read_volume(args.volume), PRESETS[args.preset], **_framing(args))
    write_volume(view.volume, args.output)
    if args.json:
        print(json.dumps({"volume": args.volume, "view": args.output, **view.to_dict()}, indent=1))
        return
    low, high = (", ".join(f"{c:.1f}" for c in corner) for corner in view.box_ras)
    print(f"model input ({' x '.join(map(str, view.volume.shape))}) written to {args.output}; it covers the box "
          f"from RAS ({low}) to ({high}) mm")


def cmd_evaluate(args) -> None:
    from dataclasses import asdict

    from .data.m3d import write_dataset, written_cases
    from .eval.phantom_eval import evaluate_phantoms, summary_text
    from .generation import REPORT_SETTINGS

    if args.benchmark == "m3d":
        return _evaluate_m3d(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would repeat the whole evaluation
        raise Med3DVLMError("The phantom evaluation runs in one process; start it without torchrun "
                            "(evaluate m3d and report share their work over ranks).")
    data, n, split = args.data, args.n or 100, args.split or "train"
    if data is None:  # fresh phantoms the model never saw
        data = Path(args.work) / f"eval-phantoms-seed{args.seed}"
        if written_cases(data, args.seed) < n:  # a folder of fewer (or stale) phantoms is written again
            write_dataset(data, n, args.seed, modality="CT", splits=(1.0, 0.0, 0.0), progress=True)
    probe_fit = None
    if args.probe_fit:  # other fresh phantoms for the image-token probe to learn from
        if args.probe_fit == args.seed:
            raise Med3DVLMError("--probe-fit must differ from --seed: the probe is scored on the evaluation phantoms.")
        probe_fit = Path(args.work) / f"probe-fit-phantoms-seed{args.probe_fit}"
        if written_cases(probe_fit, args.probe_fit) < PROBE_FIT_N:
            write_dataset(probe_fit, PROBE_FIT_N, args.probe_fit, modality="CT", splits=(1.0, 0.0, 0.0), progress=True)
    pipe, started = _pipeline(args), time.perf_counter()
    results = evaluate_phantoms(pipe, data, split=split, n=n, probe_fit=probe_fit, probe_fit_n=PROBE_FIT_N)
    results["provenance"] = {**_provenance(pipe, "evaluate", None, {}, time.perf_counter() - started),
                             "generation": {"reports": asdict(REPORT_SETTINGS), "closed_vqa": "most likely choice"}}
    print(summary_text(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def _evaluate_m3d(args) -> None:
    """The paper's M3D tasks on M3D-Cap / M3D-VQA files; resumable, see eval/m3d_bench.py."""
    from .eval.m3d_bench import BenchmarkConfig, M3DBenchmark
    from .eval.m3d_summary import format_table, summarize, write_summary
    from .distributed import cleanup, init_distributed

    if not args.root or not args.out:
        raise Med3DVLMError("evaluate m3d needs --root (the data root of M3D_Cap_npy/ and M3D-VQA/) and --out.")
    info = init_distributed(None if args.device == "auto" else args.device)
    if info.world_size > 1 and args.device == "auto":
        args.device = str(info.device)  # this rank's own GPU
    config = BenchmarkConfig(
        root=Path(args.root), out=Path(args.out), split=args.split or "test", cap_json=args.cap, vqa_csv=args.vqa,
        vqa_open_csv=args.vqa_open, n=args.n or 2000, n_vqa=args.n_vqa, tasks=tuple(args.tasks.split(",")),
        closed_mode=args.closed, batch_size=args.batch_size, generation=_settings(args),
        bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers, wordnet=args.wordnet,
        rank=info.rank, world=info.world_size, progress=info.is_main)
    bench = M3DBenchmark(_pipeline(args), config)
    if not bench.meteor.synonyms and info.is_main:
        print(f"med3dvlm: warning: {bench.meteor.note}", file=sys.stderr)
    results = bench.run()  # under torchrun: each rank its share, then rank 0 merges
    if info.is_main:
        summary = summarize(bench, results)
        summary["ranks"] = info.world_size
        print(format_table(summary))
        print(f"\nper-sample results and summary.json in {write_summary(summary, config.out).parent}")
    cleanup()


def cmd_serve(args) -> None:
    from .server.config import MiB, ServerConfig, resolve_token
    from .server.serve import serve

    try:
        token, generated = resolve_token(args.host, args.token_file)
    except (OSError, ValueError) as error:
        raise Med3DVLMError(str(error)) from None
    if generated:
        print(f"med3dvlm: access token of this server (shown once; clients pass it as token=... or in a "
              f"--token-file): {token}", file=sys.stderr, flush=True)
    folder = Path(args.allow_folder).expanduser().resolve() if args.allow_folder else None
    if folder is not None and not folder.is_dir():
        raise Med3DVLMError(f"--allow-folder {args.allow_folder} is not a folder.")
    config = ServerConfig(token=token, max_volume_bytes=args.max_volume_mb * MiB, allowed_folder=folder,
                          max_waiting=args.max_waiting)
    serve(lambda: _pipeline(args), config, host=args.host, port=args.port, model_label=args.model,
          ready_file=args.ready_file, exit_with_stdin=args.exit_with_stdin, log_level=args.log_level)


def cmd_inspect(args) -> None:
    from .inspect_model import describe_model, format_description

    folder = _model_folder(args.model)
    info = describe_model(folder, allow_pickle=args.allow_pickle)
    print(json.dumps(info, indent=1, default=str) if args.json else format_description(info))


def cmd_convert(args) -> None:
    import torch

    from .convert import convert

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = convert(args.source, args.out, dtype=dtype, allow_pickle=args.allow_pickle)
    print(f"wrote {out}; load it with: med3dvlm report VOLUME --model {out}")


def _model_folder(model: str) -> Path:
    from .resources import demo_model_dir

    return demo_model_dir() if model == "demo" else Path(model)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="describe volumes and what preprocessing would do")
    p.add_argument("volumes", nargs="+")
    p.add_argument("--preset", default="med3dvlm", help="preprocessing preset (default: med3dvlm)")
    p.set_defaults(func=cmd_info)


def _phantoms_parser(sub) -> None:
    p = sub.add_parser("phantoms", help="write a synthetic dataset in the M3D layouts")
    p.add_argument("outdir")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality", choices=["CT", "MR"], default="CT")
    p.set_defaults(func=cmd_phantoms)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="generate a report for each volume")
    p.add_argument("volumes", nargs="+", help="volume files, folders of them, or DICOM series folders")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--output-dir", help="write one file per volume (skipping those done before) and summary.json; "
                                        "under torchrun each rank takes its share")
    p.add_argument("--batch-size", type=int, default=4, help="volumes generated together (default: 4)")
    _add_model_args(p)
    _add_generation_args(p)
    _add_framing_args(p)
    p.set_defaults(func=cmd_report)


def _ask_parser(sub) -> None:
    p = sub.add_parser("ask", help="answer one question about a volume")
    p.add_argument("volume")
    p.add_argument("question")
    p.add_argument("--choices", nargs="+", help="answer choices of a closed question (2 to 4)")
    p.add_argument("--json", action="store_true", help="print the answer and its provenance as JSON")
    _add_model_args(p)
    _add_generation_args(p)
    _add_framing_args(p)
    p.set_defaults(func=cmd_ask)


def _chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive, streaming chat about a volume")
    p.add_argument("volume")
    _add_model_args(p)
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)


def _detect_parser(sub) -> None:
    p = sub.add_parser("detect", help="MRI abnormality scores (MedMAP) for a volume or a multi-sequence study")
    p.add_argument("volumes", nargs="+", help="MRI volumes of one study (one per sequence)")
    p.add_argument("--sequence", dest="sequences", action="append", default=[],
                   help="sequence of each volume in order (T1, T2, FLAIR, DWI, ADC, T1C); default: from headers/names")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_args(p)
    _add_framing_args(p, window=False)
    p.set_defaults(func=cmd_detect)


def _retrieve_parser(sub) -> None:
    p = sub.add_parser("retrieve", help="rank texts (strings or text files) for a volume")
    p.add_argument("volume")
    p.add_argument("texts", nargs="+")
    _add_model_args(p)
    p.set_defaults(func=cmd_retrieve)


def _explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="evidence map: where in the volume an answer (or the report) came from")
    p.add_argument("volume")
    p.add_argument("question", nargs="?", help="the question whose answer to explain (default: the report)")
    p.add_argument("--output", required=True, help="the map on the volume's grid (.nii.gz, .nii or .nrrd)")
    p.add_argument("--answer", help="the answer to explain (default: the model's own, generated greedily)")
    p.add_argument("--choices", nargs="+", help="answer choices of a closed question (2 to 4)")
    p.add_argument("--score", metavar="LABEL", help="explain an MRI abnormality score instead, e.g. 'cyst in the liver'")
    p.add_argument("--method", choices=["smoothgrad", "integrated"], default="smoothgrad",
                   help="SmoothGrad x input, or Integrated Gradients from a black image (default: smoothgrad)")
    p.add_argument("--samples", type=int, default=8, help="forward and backward passes (default: 8)")
    p.add_argument("--json", action="store_true", help="print the answer, the map's peak and provenance as JSON")
    _add_model_args(p)
    _add_framing_args(p)
    p.set_defaults(func=cmd_explain)


def _view_parser(sub) -> None:
    p = sub.add_parser("view", help="write what the model is shown (its input, placed over the scan)")
    p.add_argument("volume")
    p.add_argument("--output", required=True, help="the model's input as a volume (.nii.gz, .nii or .nrrd)")
    p.add_argument("--preset", default="med3dvlm", help="preprocessing preset (default: med3dvlm; the demo model: demo)")
    p.add_argument("--json", action="store_true", help="print the covered box and the preprocessing as JSON")
    _add_framing_args(p)
    p.set_defaults(func=cmd_view)


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="phantoms: findings, closed VQA, R@K; m3d: the paper's M3D benchmark")
    p.add_argument("benchmark", nargs="?", choices=["phantoms", "m3d"], default="phantoms",
                   help="phantoms (default): phantom ground truth; m3d: retrieval, reports, open/closed VQA on "
                        "M3D-Cap/M3D-VQA files with the paper's metrics")
    p.add_argument("--data", help="phantoms: M3D-layout phantom dataset (default: write fresh phantoms)")
    p.add_argument("--split", default=None, help="split to use (default: train for phantoms, test for m3d)")
    p.add_argument("-n", type=int, default=None,
                   help="volumes (phantoms, default 100) or M3D-Cap samples for retrieval and reports (m3d, default 2000)")
    p.add_argument("--seed", type=int, default=12345, help="seed of fresh phantoms (default: 12345)")
    p.add_argument("--work", default="runs", help="where fresh phantoms are written (default: runs)")
    p.add_argument("--probe-fit", type=int, default=777, metavar="SEED",
                   help=f"phantoms: seed of {PROBE_FIT_N} other phantoms the image-token probe is fitted on "
                        "(default: 777; 0 skips the probe)")
    p.add_argument("--json", help="phantoms: also write the results to this JSON file")
    _add_m3d_benchmark_args(p.add_argument_group("m3d benchmark"))
    _add_model_args(p, remote=False)  # evaluation reads the model's towers directly
    _add_generation_args(p)
    p.set_defaults(func=cmd_evaluate)


def _add_m3d_benchmark_args(m3d) -> None:
    m3d.add_argument("--root", help="data root that the files' relative paths start from")
    m3d.add_argument("--out", help="folder for per-sample JSONL and summary.json; a rerun resumes there")
    m3d.add_argument("--cap", help="M3D-Cap json (default: ROOT/M3D_Cap_npy/M3D_Cap.json)")
    m3d.add_argument("--vqa", help="M3D-VQA csv (default: ROOT/M3D-VQA/M3D_VQA_{split}.csv)")
    m3d.add_argument("--vqa-open", help="extra open-only csv (default: ROOT/M3D-VQA/M3D_VQA_open_{split}.csv if present)")
    m3d.add_argument("--n-vqa", type=int, default=None, help="first N rows of each VQA csv (default: all)")
    m3d.add_argument("--tasks", default="retrieval,report,vqa_open,vqa_closed", help="comma-separated subset")
    m3d.add_argument("--closed", choices=["generate", "likelihood"], default="generate",
                     help="closed VQA: generate and look for 'X.' as the official script (default), or pick the "
                          "most likely choice")
    m3d.add_argument("--batch-size", type=int, default=4, help="volumes per batch for retrieval and reports")
    m3d.add_argument("--bertscore-model", help="local BERTScore encoder folder (the paper: roberta-large)")
    m3d.add_argument("--bertscore-layers", type=int, default=None,
                     help="its layer (default: bert-score's for the folder's name, e.g. roberta-large 17)")
    m3d.add_argument("--wordnet", help="WordNet 3.0 dict folder for METEOR (default: searched, e.g. /usr/share/wordnet)")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP to the Slicer module and med3dvlm.connect")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; any other needs a token)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; default: 8000)")
    p.add_argument("--token-file", help="file holding the access token (else $MED3DVLM_TOKEN; a non-loopback "
                                        "server without either generates one and prints it once)")
    p.add_argument("--allow-folder", help="the one folder on this machine whose files clients may name")
    p.add_argument("--max-volume-mb", type=int, default=2048, help="largest volume accepted, in MiB of voxels")
    p.add_argument("--max-waiting", type=int, default=32, help="requests allowed to wait in line")
    p.add_argument("--ready-file", help="write {url, pid} as JSON here once listening (for a parent process)")
    p.add_argument("--exit-with-stdin", action="store_true", help="stop when standard input closes")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_model_args(p, remote=False)
    p.set_defaults(func=cmd_serve)


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="what a model folder is, its size, and the memory it needs")
    p.add_argument("model", help="'demo' or a model folder (ours or an official release)")
    p.add_argument("--json", action="store_true", help="print the details as JSON")
    _add_pickle_arg(p)
    p.set_defaults(func=cmd_inspect)


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="write an official release folder in this package's own format")
    p.add_argument("source", help="official Med3DVLM folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    _add_pickle_arg(p)
    p.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="med3dvlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_info_parser, _phantoms_parser, _report_parser, _ask_parser, _chat_parser, _detect_parser,
                _retrieve_parser, _explain_parser, _view_parser, _evaluate_parser, _serve_parser, _inspect_parser,
                _convert_parser,
                add_train_parser, add_detection_eval_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Med3DVLMError as error:
        print(f"med3dvlm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmed3dvlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
