"""llamapipe: the stages of the PaddleNLP LLaMA fine-tune/export/serve pipeline.

Stage modules import Paddle lazily and stay Python 3.9 compatible: on the NPU target they
run inside the paddle-npu container (py39).
"""

__version__ = "0.1.0"
