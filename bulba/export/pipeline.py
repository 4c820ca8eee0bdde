"""export.py's pipeline: check -> write GGUF (temp) -> verify in llama.cpp -> rename -> extras.

Nothing that looks valid is left behind on failure: the GGUF is written and verified under
a `.tmp-` name beside the target and only renamed into place after it passed; the HF folder
is built the same way (bulba.atomic.atomic_dir).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bulba.atomic import TMP_PREFIX, fsync_dir, write_text
from bulba.errors import UserError
from bulba.export.gguf import LLAMA_CPP_TYPES, all_types, check_type, quantize_with_llama_cpp, write_gguf
from bulba.export.source import open_source, remove_quietly


@dataclass
class ExportResult:
    out: Path
    type: str
    sha256: str
    seconds: dict = field(default_factory=dict)
    verdict: str | None = None
    report: object | None = None  # bulba.export.verify.Report
    hf_out: Path | None = None
    hf: dict | None = None
    modelfile: Path | None = None
    mlflow: dict | None = None
    output_models: Path | None = None


def modelfile_text(gguf_name: str, tok) -> str:
    """Ollama Modelfile: the Llama-3 chat turns (Go template, bulba.data.chat) and the
    turn-ending stop tokens."""
    from bulba.data.chat import ollama_template

    eot = tok.end_of_turn
    stops = ["<|start_header_id|>", "<|end_header_id|>", eot] + ([tok.eos] if tok.eos != eot else [])
    return f'FROM ./{gguf_name}\n\nTEMPLATE """{ollama_template(eot)}"""\n\n' + "".join(
        f'PARAMETER stop "{s}"\n' for s in stops
    )


def check_register_name(name: str) -> None:
    """A registered name also names output_models/<name>-<type>.gguf: it must stay a plain file
    name (no folders, no '..', no control characters), so it cannot point outside output_models."""
    bad = [c for c in name if c in "/\\" or ord(c) < 32 or c == "\x7f"]
    if bad or name.strip() in (".", "..") or name.startswith("."):
        raise UserError(
            f"--register {name!r}: a model name may not contain '/', '\\', control characters "
            "or start with '.'; e.g. --register bulba-demo"
        )


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export(
    source: str,
    type_name: str,
    out: str | os.PathLike,
    *,
    register: str | None = None,
    hf_out: str | os.PathLike | None = None,
    hf_dtype: str = "f32",
    force: bool = False,
    verify: bool | None = None,
    name: str | None = None,
    mlflow: bool = True,
    experiment: str | None = None,
    quiet: bool = False,
) -> ExportResult:
    """verify=None: verify when llama-cpp-python is installed (True requires it)."""
    from bulba.export.llamacpp import llama_cpp_available

    say = (lambda m: None) if quiet else _say
    out = Path(out)
    if out.suffix != ".gguf":
        raise UserError(f"--out {out} must end in .gguf")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name ending in .gguf")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    if hf_out is not None and Path(hf_out).exists() and not force:
        raise UserError(f"{hf_out} exists; pass --force to replace it")
    if register is not None and not register.strip():
        raise UserError("--register needs a model name")
    if register is not None:
        check_register_name(register)
    if verify is None:
        verify = llama_cpp_available()
    elif verify and not llama_cpp_available():
        raise UserError("verification needs llama-cpp-python (pip install llama-cpp-python), or pass --no-verify")

    if register or mlflow:  # a dead server: find out now, not after minutes of MLflow retries
        from bulba.tracking import check_reachable

        try:
            check_reachable(f"cannot register '{register}'" if register else "cannot log the export")
        except UserError as e:
            if register:
                raise
            say(f"warning: {e}; exporting without an MLflow run")
            mlflow = False

    if type_name not in all_types():  # before any download or heavy work
        raise UserError(f"unknown type '{type_name}'; valid types: {', '.join(all_types())}")

    src = open_source(source)
    made_dir = None if out.parent.exists() else next(p for p in [out.parent, *out.parent.parents] if p.parent.exists())
    tmp = out.parent / f"{TMP_PREFIX}{out.name}.{os.getpid()}"
    tmp_f32 = out.parent / f"{TMP_PREFIX}{out.stem}.f32.{os.getpid()}.gguf"
    try:
        check_type(type_name, src)
        name = name or register or src.name
        res = ExportResult(out=out, type=type_name, sha256="")
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            if type_name in LLAMA_CPP_TYPES:
                write_gguf(src, "f32", tmp_f32, name)
                quantize_with_llama_cpp(tmp_f32, tmp, type_name)
                remove_quietly(tmp_f32)
                with open(tmp, "rb") as f:  # llama.cpp does not fsync; we rename only durable files
                    os.fsync(f.fileno())
            else:
                write_gguf(src, type_name, tmp, name)
        except OSError as e:  # disk full (ENOSPC), file size limit (EFBIG): the temp file goes, out stays
            keep = f"the existing {out} is unchanged" if out.exists() else f"nothing was written to {out}"
            why = e.strerror or f"{e}: the disk is full or a file size limit was reached"  # numpy's tofile drops errno
            raise UserError(f"cannot write {out} ({why}); {keep}; free space and export again") from None
        res.seconds["write_s"] = time.perf_counter() - t0
        say(f"wrote {type_name} GGUF ({tmp.stat().st_size / 1e6:.1f} MB) in {res.seconds['write_s']:.1f} s")

        report = model = None
        if verify:
            from bulba.export.source import load_torch_model
            from bulba.export.verify import verify_gguf

            t1 = time.perf_counter()
            model = load_torch_model(src)
            report = verify_gguf(tmp, src, type_name, model=model)
            res.seconds["verify_s"] = time.perf_counter() - t1
            res.verdict, res.report = report.verdict, report
            print(report.verdict, flush=True)
            if not report.passed:
                raise UserError(report.verdict)
        else:
            say(
                "verification skipped ("
                + ("--no-verify" if llama_cpp_available() else "llama-cpp-python not installed")
                + ")"
            )

        from bulba.atomic import sha256_file
        from bulba.export.registry import place_in_output_models

        res.sha256 = sha256_file(tmp)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        res.modelfile = out.with_suffix(".Modelfile")
        write_text(res.modelfile, modelfile_text(out.name, src.tokenizer))
        say(f"{out} (sha256 {res.sha256[:16]}...), Ollama: ollama create {name} -f {res.modelfile}")

        if hf_out is not None:
            from bulba.export.hf import write_hf

            t2 = time.perf_counter()
            res.hf_out = write_hf(src, hf_out, dtype=hf_dtype, force=force)
            res.seconds["hf_write_s"] = time.perf_counter() - t2
            if verify:
                from bulba.export.verify import verify_hf

                res.hf = verify_hf(res.hf_out, src, model=model, dtype=hf_dtype)
                line = (
                    f"verify HF folder in transformers: {'PASS' if res.hf['passed'] else 'FAIL'}: "
                    f"tokens {'identical' if res.hf['tokens_match'] else 'DIFFER'}, "
                    f"max |dlogit| {res.hf['max_abs_logit_diff']:.3g} ({res.hf['max_rel_logit_diff']:.2e} of scale), "
                    f"top-1 {res.hf['top1_agreement']:.1%}"
                )
                print(line, flush=True)
                if not res.hf["passed"]:
                    import shutil

                    shutil.rmtree(res.hf_out, ignore_errors=True)
                    raise UserError(line)
            say(f"HF folder: {res.hf_out}")

        if register:
            res.output_models = place_in_output_models(out, register, type_name)
        if mlflow or register:
            from bulba.export.registry import log_export

            try:
                res.mlflow = log_export(
                    src=src,
                    gguf_path=out,
                    type_name=type_name,
                    sha256=res.sha256,
                    report=report,
                    hf_report=res.hf,
                    modelfile=res.modelfile,
                    register=register,
                    experiment=experiment,
                    timings=res.seconds,
                )
            except Exception as e:  # tracking server down etc.: the file is fine, say what failed
                msg = (str(e).splitlines() or [type(e).__name__])[0]
                if register:
                    raise UserError(f"wrote {out}, but registering it in MLflow failed: {msg}") from None
                say(f"warning: wrote {out}, but logging the export to MLflow failed: {msg}")
            if res.mlflow:
                say(
                    f"MLflow export run {res.mlflow['run_id']}"
                    + (f", registered {res.mlflow['model_uri']}" if "model_uri" in res.mlflow else "")
                )
                if res.mlflow.get("aliases"):
                    say(f"aliases of {register}: " + "; ".join(res.mlflow["aliases"]))
        return res
    except BaseException:
        remove_quietly(tmp, tmp_f32)
        if made_dir is not None:  # a directory we created for a failed export: remove it if empty
            for d in [out.parent, *out.parent.parents]:
                try:
                    d.rmdir()
                except OSError:
                    break
                if d == made_dir:
                    break
        raise
    finally:
        remove_quietly(tmp, tmp_f32)
        src.cleanup()
