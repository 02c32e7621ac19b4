"""Training phases as data (shared/DESIGN.md §2): phase specs, curricula, and the callback that applies them."""

from halfbody.phases.callback import CurriculumCallback
from halfbody.phases.spec import Curriculum, LinearSchedule, PhaseSpec, check_group_names, set_trainable_groups

__all__ = ["Curriculum", "CurriculumCallback", "LinearSchedule", "PhaseSpec", "check_group_names",
           "set_trainable_groups"]
