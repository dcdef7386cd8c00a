"""Classes of the user's own, next to the script (see compat_helper_types.py)."""
import dataclasses


@dataclasses.dataclass
class Square:
    side: float

    def area(self):
        return self.side * self.side
