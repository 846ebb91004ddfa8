"""More students trained from the same teacher pass (`model.students`; EUPE / DINOv3-style multi-distillation).

    model:
      student: {...}                       # the first student (named "student"; benchmarks and plain export use it)
      students:                            # more students: each gets its own heads, optimizer groups and export
        - class_path: distill.students.StudentSpec
          init_args:
            name: tiny
            student: {class_path: distill.model.StudentModel, init_args: {...}}
            lr_scale: 2.0

Every training batch runs the teachers once (or reads one teacher-cache batch); each student then predicts every
teacher from its own forward pass. Logs of the extra students are `<stage>/<name>/<teacher>/<loss>`; `<stage>/loss`
is the sum over all students (what is optimized). `unitower distill export --student NAME` writes one of them.
"""

from __future__ import annotations

from distill.model import StudentModel


class StudentSpec:
    """One extra student of a multi-student run.

    Args:
        name: a plain identifier, unique, not ``student`` (the first student's name) nor a teacher's name; used in
            log keys, checkpoint keys (``students.<name>.*``, ``ema.<name>.*``) and ``distill export --student``.
        student: the student model (backbone only; the module adds one adaptor head per teacher); its
            ``summary_names`` must list the teachers that have a summary, like the first student's.
        lr_scale: multiplies the optimizer's learning rate for this student's parameters.
        adaptor_hidden_dim: hidden width of this student's adaptor MLPs; None: the module's ``adaptor_hidden_dim``.
        adaptor_layers: Linear layers per adaptor MLP; None: the module's ``adaptor_layers``.
    """

    def __init__(self, name: str, student: StudentModel, lr_scale: float = 1.0, adaptor_hidden_dim: int | None = None,
                 adaptor_layers: int | None = None) -> None:
        if not name.isidentifier() or name == "student":
            raise ValueError(f"model.students: name {name!r} must be a plain identifier other than 'student' "
                             "(the name of model.student), e.g. 'tiny' or 'vit_b'.")
        if lr_scale <= 0:
            raise ValueError(f"model.students[{name}]: lr_scale must be > 0, got {lr_scale}.")
        self.name, self.student, self.lr_scale = name, student, lr_scale
        self.adaptor_hidden_dim, self.adaptor_layers = adaptor_hidden_dim, adaptor_layers
