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


def test_blocker_really_blocks():
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "torch is blocked" in result.stderr
