"""`hovle-edge demo`: the whole method in the shapes world on a CPU. Teacher and language model,
the three stages, export to ONNX, questions on fresh scenes answered through the torch-free runtime,
accuracy and latency written to report.json. Each step is skipped when its output is already there."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from hovle_edge.errors import InputError
from hovle_edge.files import claim_directory, read_json, write_json
from hovle_edge.shapes import world
from hovle_edge.shapes.lm import LM_DEFAULTS
from hovle_edge.train.loop import TrainSettings, finished, training_device, uses_bf16
from hovle_edge.shapes.teacher import TEACHER_DEFAULTS


@dataclass
class DemoPlan:
    """Sizes and steps; `quick` is the shortened version the tests run. `seed` draws the data and
    starts every model (teacher, LM, stages); the questions it is scored on stay the same."""

    seed: int = 0
    caption_records: int = 16000
    chat_scenes: int = 16000  # their questions two to a conversation (see world.write_dataset)
    distill_images: int = 1000
    teacher: TrainSettings = field(default_factory=lambda: TEACHER_DEFAULTS)
    lm: TrainSettings = field(default_factory=lambda: LM_DEFAULTS)
    distill: TrainSettings = field(default_factory=lambda: TrainSettings(steps=150, batch_size=16, lr=1e-3, warmup=20))
    # Stage 2 decides what the frozen LLM can read out of the image tokens. Colour comes last, suddenly,
    # after a number of updates that varies from seed to seed, so many small steps leave room for a late
    # escape (docs/experiments.md, sixth look).
    align: TrainSettings = field(default_factory=lambda: TrainSettings(steps=2000, batch_size=8, lr=1e-3, warmup=30))
    # Stage 3 is where the answers are learned, so most of the time goes there, up to where more steps
    # stopped helping (docs/experiments.md, fifth look).
    instruct: TrainSettings = field(default_factory=lambda: TrainSettings(steps=1200, batch_size=32, lr=4e-4, warmup=30))
    embedding_layers: int = 4
    questions: int = 200

    @classmethod
    def for_this_machine(cls, seed: int = 0) -> "DemoPlan":
        """One plan for every CPU: where bf16 is native the loop autocasts and the same steps finish sooner."""
        return cls(seed=seed)

    @classmethod
    def quick(cls, seed: int = 0) -> "DemoPlan":
        return cls(seed=seed, caption_records=200, chat_scenes=40, distill_images=100, questions=20,
                   teacher=TrainSettings(steps=20, batch_size=8, lr=2e-3, warmup=5),
                   lm=TrainSettings(steps=20, batch_size=16, lr=2e-3, warmup=5),
                   distill=TrainSettings(steps=10, batch_size=8, lr=1e-3, warmup=2),
                   align=TrainSettings(steps=10, batch_size=8, lr=1e-3, warmup=2),
                   instruct=TrainSettings(steps=10, batch_size=8, lr=5e-4, warmup=2), embedding_layers=2)

    def seeded(self, settings: TrainSettings) -> TrainSettings:
        return replace(settings, seed=self.seed)

    def data_seed(self, part: int) -> int:
        """Scene seeds of the training data: far from evaluate.EVAL_SEED's scenes for every demo seed."""
        return 100 * (self.seed + 1) + part


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(out: str = "hovle-demo", plan: DemoPlan | None = None, progress: bool = True) -> dict:
    from hovle_edge.export import export_model
    from hovle_edge.shapes.lm import pretrain_lm
    from hovle_edge.train.stages import run_stage
    from hovle_edge.shapes.teacher import pretrain_teacher

    # Steps already done are reused, so `out` must be a demo folder (or new): never someone else's files.
    claim_directory(out, "demo", owned_by=lambda p: os.path.isfile(os.path.join(p, "report.json")), what="demo folder")
    plan = plan or DemoPlan.for_this_machine()
    started = time.perf_counter()
    seconds = {}

    def timed(name, work, *args, **kwargs):
        began = time.perf_counter()
        result = work(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - began, 1)
        return result

    paths = {name: os.path.join(out, name) for name in
             ("data", "teacher", "lm", "stage1-distill", "stage2-align", "stage3-instruct", "onnx")}
    data = paths["data"]
    if not os.path.isfile(os.path.join(data, "chat.jsonl")):
        say("drawing the shapes world's training data")
        timed("data", draw_data, data, plan)
    if not finished(paths["teacher"]):
        say("training the teacher vision encoder (stand-in for InternViT)")
        timed("teacher", pretrain_teacher, paths["teacher"], plan.seeded(plan.teacher), progress=progress)
    if not finished(paths["lm"]):
        say("training the language model (stand-in for InternLM2)")
        timed("lm", pretrain_lm, paths["lm"], plan.seeded(plan.lm), progress=progress)
    stages = [("distill", paths["lm"], paths["stage1-distill"], os.path.join(data, "distill", "images"), plan.distill),
              ("align", paths["stage1-distill"], paths["stage2-align"], os.path.join(data, "caption.jsonl"), plan.align),
              ("instruct", paths["stage2-align"], paths["stage3-instruct"], os.path.join(data, "chat.jsonl"), plan.instruct)]
    for stage, init, target, stage_data, settings in stages:
        if not finished(target):
            say(f"stage {stage}")
            timed(stage, run_stage, stage, init, target, data=stage_data, overrides=vars(plan.seeded(settings)),
                  teacher=paths["teacher"], embedding={"num_hidden_layers": plan.embedding_layers, "image_size": world.DRAWN_SIZE},
                  held_out=os.path.join(data, "held-out", "images"), progress=progress)
    if not os.path.isfile(os.path.join(paths["onnx"], "manifest.json")):
        say("exporting to ONNX")
        timed("export", export_model, paths["stage3-instruct"], paths["onnx"], max_context=1024, progress=progress)
    say(f"answering {plan.questions} questions about fresh scenes")
    report = timed("evaluate", evaluate, paths, plan.questions)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["plan"] = {"seed": plan.seed, "caption_records": plan.caption_records, "align_steps": plan.align.steps,
                      "chat_scenes": plan.chat_scenes, "instruct_steps": plan.instruct.steps,
                      "bf16": uses_bf16(plan.instruct.precision, training_device())}
    report["seconds_by_step"] = seconds  # only the steps this run did; reused ones are absent
    write_json(os.path.join(out, "report.json"), report)
    return report


def draw_data(data: str, plan: DemoPlan) -> None:
    world.write_dataset(os.path.join(data, "distill"), "caption", plan.distill_images, seed=plan.data_seed(1))
    world.write_dataset(os.path.join(data, "held-out"), "caption", 64, seed=plan.data_seed(2))
    world.write_dataset(data, "caption", plan.caption_records, seed=plan.data_seed(3))
    world.write_dataset(data, "chat", plan.chat_scenes, seed=plan.data_seed(4))


def evaluate(paths: dict, count: int) -> dict:
    from hovle_edge.model import HoVLE
    from hovle_edge.runtime import Pipeline
    from hovle_edge.tokenizer import ChatTemplate, Tokenizer
    from hovle_edge.shapes.evaluate import (caption_exact, described_questions, follow_up_questions, percent,
                                           runtime_answer, runtime_follow_up, scored_scenes, text_questions,
                                           torch_answer)
    from hovle_edge.model.llm import InternLM2ForCausalLM
    from hovle_edge.shapes.lm import LM_TEMPLATE, lm_answer

    model = HoVLE.from_pretrained(paths["stage3-instruct"])
    tokenizer = Tokenizer.from_dir(paths["stage3-instruct"])
    template = ChatTemplate(model.config.tokens_per_tile, model.config.extra.get("system_message"))
    scored = scored_scenes(count)
    items = [(image, question, answer) for _, image, question, answer in scored]
    expected = [a for _, _, a in items]
    torch_answers = [torch_answer(model, tokenizer, template, q, image) for image, q, _ in items]
    with Pipeline.from_dir(paths["onnx"]) as pipe:
        timings = []
        runtime_answers = [runtime_answer(pipe, question, image, timings=timings) for image, question, _ in items]
        ttft = [t.first_token for t in timings]
        per_token = [step for t in timings for step in t.steps]
        texts = text_questions(max(1, count // 2))  # 100 for the demo's 200
        final_text = [runtime_answer(pipe, q) for q, _ in texts]
        follow_ups = follow_up_questions(max(1, count // 2))
        follow_up_answers = [runtime_follow_up(pipe, first, second, image) for image, first, second, _ in follow_ups]
    lm = InternLM2ForCausalLM.from_pretrained(paths["lm"])
    lm_text = [lm_answer(lm, tokenizer, LM_TEMPLATE, q) for q, _ in texts]
    described = described_questions(scored)
    lm_described = [lm_answer(lm, tokenizer, LM_TEMPLATE, q) for q, _ in described]
    by_kind = {}
    for (_, question, answer), got in zip(items, runtime_answers):
        kind = " ".join(question.split()[:2])
        right, total = by_kind.get(kind, (0, 0))
        by_kind[kind] = (right + (got == answer), total + 1)
    report = {
        "accuracy": percent(runtime_answers, expected),
        "accuracy_pytorch": percent(torch_answers, expected),
        "runtime_equals_pytorch": percent(runtime_answers, torch_answers),
        "questions": count,
        "accuracy_by_question": {k: round(100.0 * r / t, 1) for k, (r, t) in by_kind.items()},
        "follow_up_accuracy": percent(follow_up_answers, [a for *_, a in follow_ups]),  # asked second in a chat
        "follow_ups": len(follow_ups),
        "language_kept": percent(final_text, lm_text),
        "text_questions": len(texts),
        "lm_text_accuracy": percent(lm_text, [a for _, a in texts]),
        "lm_described_accuracy": percent(lm_described, [a for _, a in described]),  # the scenes in words
        "latency_ms": {"time_to_first_token_p50": 1000 * float(np.median(ttft)),
                       "per_token_p50": 1000 * float(np.median(per_token)) if per_token else None},
        "examples": [{"question": q, "expected": a, "answer": got} for (_, q, a), got in list(zip(items, runtime_answers))[:5]],
    }
    teacher = read_json(os.path.join(paths["teacher"], "config.json"), InputError)
    report["teacher_accuracy_on_things"] = teacher.get("accuracy_on_things")
    aligned = HoVLE.from_pretrained(paths["stage2-align"])
    report["caption_exact_after_align"] = caption_exact(aligned, tokenizer, template, count=max(1, count // 4))
    scores = os.path.join(paths["stage1-distill"], "distill_scores.json")
    if os.path.isfile(scores):
        report["distill"] = {k: v for k, v in read_json(scores, InputError).items() if k.endswith("cosine")}
    return report
