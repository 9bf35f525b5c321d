"""Ground truth of one rendered warehouse-cell frame: what is where, and where it shows in the image."""

from __future__ import annotations

from dataclasses import asdict, dataclass

COLORS = ("red", "green", "blue", "yellow", "orange", "purple")
LEVELS = ("top", "middle", "bottom")
SLOTS = ("one", "two", "three", "four")
LABELS = tuple("ABCDEF")
OBJECT_KINDS = ("box", "tote", "cone", "pallet")
PLACES = ("shelf", "floor", "aisle", "conveyor", "gripper")

Box2D = tuple[int, int, int, int]


@dataclass(frozen=True)
class CellObject:
    """One object of the cell and its visible evidence in the frame."""

    id: int  # stable within an episode
    kind: str  # "box" | "tote" | "cone" | "pallet"
    color: str | None  # one of COLORS for box/tote, else None
    label: str | None  # "A".."F" when a box carries a label plate, else None
    place: str  # "shelf" | "floor" | "aisle" | "conveyor" | "gripper"
    level: str | None  # "top" | "middle" | "bottom" when place == "shelf"
    slot: str | None  # "one" | "two" | "three" | "four" when place == "shelf"
    box: Box2D | None  # visible 2D evidence box (x0, y0, x1, y1), pixels, from the segmentation render
    visible_fraction: float  # visible pixels / pixels if unoccluded (approximate)


@dataclass(frozen=True)
class CellTruth:
    """Everything a question about one frame can be answered from."""

    width: int
    height: int
    objects: tuple[CellObject, ...]
    gripper_holding: int | None  # id of the object in the gripper
    aisle_blocked: bool  # a cone or pallet stands in the marked aisle
    arm_box: Box2D | None  # 2D box of the arm + gripper

    def to_json(self) -> dict:
        """A plain JSON-able dict (lists instead of tuples)."""
        d = asdict(self)
        d["objects"] = [{**o, "box": list(o["box"]) if o["box"] else None} for o in d["objects"]]
        d["arm_box"] = list(self.arm_box) if self.arm_box else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> CellTruth:
        """The inverse of :meth:`to_json`."""
        objects = tuple(CellObject(**{**o, "box": tuple(o["box"]) if o.get("box") else None}) for o in d["objects"])
        arm = tuple(d["arm_box"]) if d.get("arm_box") else None
        return cls(
            width=int(d["width"]),
            height=int(d["height"]),
            objects=objects,
            gripper_holding=d.get("gripper_holding"),
            aisle_blocked=bool(d["aisle_blocked"]),
            arm_box=arm,  # type: ignore[arg-type]
        )

    def by_id(self, object_id: int) -> CellObject | None:
        """The object with this id, if it is in the frame's truth."""
        return next((o for o in self.objects if o.id == object_id), None)

    def at_slot(self, level: str, slot: str) -> CellObject | None:
        """The object in a shelf slot, if any (at most one)."""
        return next((o for o in self.objects if o.place == "shelf" and o.level == level and o.slot == slot), None)
