"""scaling_abs: large-batch training with ABS / ABSA (Yao, Gholami, Keutzer, Mahoney).

The core library (curvature, adversarial, schedules) is importable without Accelerate or DeepSpeed;
the trainer and CLI build on it.
"""

__version__ = "0.1.0"
