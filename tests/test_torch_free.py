"""The runtime's side of the project imports without torch: a subprocess where torch cannot be imported."""

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent("""
    import sys
    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, BlockTorch())
""")


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], capture_output=True, text=True)


def test_inputs_import_without_torch():
    result = run_without_torch("""
        import hovle_edge.preprocess, hovle_edge.tokenizer, hovle_edge.config, hovle_edge.sentencepiece_model
        import numpy as np
        from PIL import Image
        pixels = hovle_edge.preprocess.preprocess_image(Image.new("RGB", (90, 40)), image_size=56)
        assert pixels.shape == (3, 3, 56, 56)
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_runtime_and_profiling_module_imports_without_torch():
    result = run_without_torch("""
        import importlib, pkgutil
        import hovle_edge.profiling, hovle_edge.runtime
        names = [f"{package.__name__}.{module.name}" for package in (hovle_edge.runtime, hovle_edge.profiling)
                 for module in pkgutil.iter_modules(package.__path__)]
        for name in names:
            importlib.import_module(name)
        assert "torch" not in sys.modules and "hovle_edge.profiling.command" in names, names
        print(len(names))
    """)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 11  # 8 runtime modules and 3 profiling ones at least


def test_blocker_really_blocks():
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "torch is blocked" in result.stderr


def test_runtime_generates_without_torch(tiny_export):
    result = run_without_torch(f"""
        import hovle_edge.runtime
        from hovle_edge.runtime import Pipeline
        from PIL import Image
        with Pipeline.from_dir({str(tiny_export)!r}) as pipe:
            text = pipe.generate("what colour?", image=Image.new("RGB", (80, 60), "red"), max_new_tokens=4)
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_cli_help_without_torch():
    for command in (["--help"], ["run", "--help"], ["chat", "--help"]):
        result = run_without_torch(f"""
            from hovle_edge.cli import main
            sys.argv = ["hovle-edge"] + {command!r}
            try:
                main()
            except SystemExit as e:
                assert e.code == 0, e.code
        """)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout
