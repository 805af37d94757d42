"""The paper's stage trainers and the shapes world they run on (needs torch)."""
