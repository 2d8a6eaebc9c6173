"""Speed options (`modeling_disa.model.inference_options`): reduced dtypes are refused on a CPU without instructions
for them and stay within a stated tolerance of float32 eager where accepted; `torch_compile` reaches the model from
the pipeline, the evaluation script and the demo, and with a tracing-only backend gives float32 eager's numbers
exactly. The CPU's flags are set per test (monkeypatched), so every case runs on any CPU: PyTorch computes
bfloat16 / float16 on any CPU, only slowly without the instructions."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate_cli import tiny_model as eval_model  # noqa: F401 - fixtures of the evaluation CLI's test
from test_evaluate_cli import voc_data  # noqa: F401
from torch._dynamo import register_backend
from transformers import pipeline

import modeling_disa.model.inference_options as options
from modeling_disa import PIPELINE_TASK, check_inference_dtype, compile_settings

REPO = Path(__file__).resolve().parent.parent
LABELS = ["sky", "grass", "red ball", "tree", "car"]
# bfloat16 keeps 8 significant bits (float16: 11), a relative rounding of 2^-9 per operation; through the tiny
# model's CLIP layers, cost volume and aggregation the logits move by up to ~3 % of their largest magnitude (measured
# 1.4-2.7 % over 3 seeds), so 5 % of max |logit| is the stated bound
RELATIVE_TOLERANCE = 0.05
COMPILED_GRAPHS = []


@register_backend
def counting_eager_backend(graph_module, example_inputs):
    """A torch.compile backend that records each graph and runs it unchanged (the traced ops, eagerly)."""
    COMPILED_GRAPHS.append(graph_module)
    return graph_module.forward


@pytest.fixture
def cpu_flags(monkeypatch):
    def set_flags(*flags):
        monkeypatch.setattr(options, "cpu_flags", lambda: frozenset(flags))

    return set_flags


def image(seed=0, size=(72, 96)):
    rng = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (*size, 3), generator=rng, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("dtype,flag", [(torch.bfloat16, "avx512_bf16"), (torch.float16, "amx_fp16")])
def test_reduced_dtype_needs_the_cpu_instructions(cpu_flags, dtype, flag):
    cpu_flags("avx2", "fma")
    with pytest.raises(ValueError, match=r"(?s)on this CPU.*float32"):
        check_inference_dtype(dtype, "cpu")
    assert check_inference_dtype("float32", "cpu") == torch.float32
    assert check_inference_dtype(dtype, "cuda") == dtype  # GPUs are not checked against the CPU's flags
    cpu_flags("avx2", flag)
    assert check_inference_dtype(str(dtype), "cpu") == dtype
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        check_inference_dtype("int4", "cpu")


def test_bfloat16_weights_on_a_cpu_without_them_are_refused(cpu_flags, tiny_model, tiny_processor):
    cpu_flags("avx2")
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    inputs = tiny_processor(images=image(), text=LABELS, return_tensors="pt")
    with pytest.raises(ValueError, match="bfloat16 on this CPU"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()})  # the processor-based API
    with pytest.raises(ValueError, match="bfloat16 on this CPU"):
        pipeline(PIPELINE_TASK, model=model, processor=tiny_processor)  # refused when built, before a first call


def test_pipeline_dtype_for_a_loaded_model_of_another_dtype_is_refused(tiny_model, tiny_processor):
    # transformers converts only a model it loads itself; a model object would silently stay in its dtype
    with pytest.raises(ValueError, match="does not convert a loaded model"):
        pipeline(PIPELINE_TASK, model=tiny_model, processor=tiny_processor, dtype=torch.bfloat16)
    same = pipeline(PIPELINE_TASK, model=tiny_model, processor=tiny_processor, dtype=torch.float32)
    assert same.model.dtype == torch.float32


@pytest.mark.parametrize("dtype,flag", [(torch.bfloat16, "amx_bf16"), (torch.float16, "avx512_fp16")])
def test_reduced_dtype_logits_within_tolerance_of_float32(cpu_flags, tiny_model, tiny_processor, dtype, flag):
    cpu_flags(flag)
    reduced = copy.deepcopy(tiny_model).to(dtype)
    for seed in range(2):
        inputs = tiny_processor(images=image(seed), text=LABELS, return_tensors="pt")
        with torch.no_grad():
            reference = tiny_model(**inputs).logits
            logits = reduced(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}).logits
        assert logits.dtype == dtype
        error = (logits.float() - reference).abs().max()
        assert error <= RELATIVE_TOLERANCE * reference.abs().max(), (seed, float(error))
    # the pipeline runs the reduced model (pixel values cast to its dtype) end to end
    entries = pipeline(PIPELINE_TASK, model=reduced, processor=tiny_processor)(image(), candidate_labels=LABELS)
    assert entries and all(0 <= e["score"] <= 1 and e["label"] in LABELS for e in entries)


def test_compile_backend_or_mode_turns_compilation_on():
    assert compile_settings() is None
    assert compile_settings(True) == {"backend": "inductor"}
    assert compile_settings(False, "eager") == {"backend": "eager"}
    assert compile_settings(False, None, "max-autotune") == {"backend": "inductor", "mode": "max-autotune"}


def same_entries(a, b) -> bool:
    return len(a) == len(b) and all(
        x["label"] == y["label"]
        and x["score"] == y["score"]
        and np.array_equal(np.array(x["mask"]), np.array(y["mask"]))
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("inference_mode", ["whole", "sliding"])
def test_pipeline_torch_compile_reaches_the_model_and_traced_graphs_are_exact(
    tiny_model, tiny_processor, inference_mode
):
    plain = pipeline(PIPELINE_TASK, model=tiny_model, processor=tiny_processor)
    compiled = pipeline(
        PIPELINE_TASK,
        model=tiny_model,
        processor=tiny_processor,
        torch_compile=True,
        torch_compile_backend="counting_eager_backend",
    )
    COMPILED_GRAPHS.clear()
    torch._dynamo.reset()
    expected = plain(image(), candidate_labels=LABELS, inference_mode=inference_mode)
    assert not COMPILED_GRAPHS
    got = compiled(image(), candidate_labels=LABELS, inference_mode=inference_mode)
    assert COMPILED_GRAPHS, "the pipeline did not run the model through torch.compile"
    assert same_entries(got, expected)
    assert not isinstance(tiny_model.forward, torch.nn.Module)  # the user's model object is left as it was


def test_evaluation_script_dtype_check_and_torch_compile(cpu_flags, eval_model, voc_data, tmp_path):  # noqa: F811
    import run_evaluation as cli

    model_dir, _ = eval_model
    common = ["--model", str(model_dir), "--datasets", "voc20", "--data_dir", str(voc_data), "--short_side", "0"]
    common += ["--warp_size", "64", "--window_size", "48", "--stride", "16"]
    cpu_flags("avx2")
    with pytest.raises(SystemExit) as refused:
        cli.main([*common, "--dtype", "bf16"])
    assert refused.value.code == 2
    cli.main([*common, "--output", str(tmp_path / "plain.json")])
    COMPILED_GRAPHS.clear()
    torch._dynamo.reset()
    cli.main([*common, "--torch_compile_backend", "counting_eager_backend", "--output", str(tmp_path / "c.json")])
    assert COMPILED_GRAPHS
    plain, compiled = (json.loads((tmp_path / n).read_text()) for n in ("plain.json", "c.json"))
    assert compiled["protocol"]["torch_compile"] == {"backend": "counting_eager_backend"}
    assert plain["protocol"]["torch_compile"] is None
    assert compiled["results"]["voc20"]["per_class_iou"] == plain["results"]["voc20"]["per_class_iou"]


def test_demo_options(cpu_flags, tmp_path):
    from modeling_disa import demo

    cpu_flags("avx2")
    with pytest.raises(SystemExit) as refused:
        demo.main(["--dtype", "bfloat16", "--output_dir", str(tmp_path / "a")])
    assert refused.value.code == 2
    cpu_flags("avx512_bf16")
    summary = demo.main(["--dtype", "bfloat16", "--output_dir", str(tmp_path / "b")])
    assert summary["dtype"] == "bfloat16" and summary["reloaded_identical"]
    assert 0 < summary["max_abs_logit_difference_to_float32_eager"] < 0.1
    COMPILED_GRAPHS.clear()
    summary = demo.main(["--torch_compile_backend", "counting_eager_backend", "--output_dir", str(tmp_path / "c")])
    assert COMPILED_GRAPHS and summary["max_abs_logit_difference_to_float32_eager"] == 0.0


def test_space_app_refuses_bfloat16_on_a_cpu_without_it(cpu_flags, capsys):
    spec = importlib.util.spec_from_file_location("disa_space_app_options", REPO / "space" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    cpu_flags("avx2")
    with pytest.raises(SystemExit) as refused:
        app.main(["--dtype", "bfloat16", "--model", "unused/never-loaded"])
    assert refused.value.code == 2 and "AVX512_BF16" in capsys.readouterr().err
