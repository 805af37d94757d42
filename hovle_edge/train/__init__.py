"""The paper's stage trainers: the training loop, the three stages and their data (needs torch). The
shapes world they are shown on lives in hovle_edge.shapes."""
