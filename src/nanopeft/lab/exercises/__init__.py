"""Exercises: graders that tell a learner, number by number, whether their code computes what peft or bitsandbytes
computes, and if not, what is wrong.

    from nanopeft.lab.exercises import blank, check_dora, check_lora, check_loraplus, check_nf4
"""
from .layers import check_dora, check_lora
from .optimizers import check_loraplus
from .quantization import check_nf4
from .report import FillThisIn, Report, blank, plot_report

__all__ = ["check_lora", "check_dora", "check_nf4", "check_loraplus", "blank", "FillThisIn", "Report", "plot_report"]
