"""The synthetic shapes world: scenes drawn with pillow, a stand-in vision teacher and language model
trained on them, and the demo that runs the paper's three stages on them and scores the result."""
