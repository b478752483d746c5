import pytest

from fedinf_jax.agents import agent_axis
from fedinf_jax.core.registry import Registry, check_choice
from fedinf_jax.data import partitions
from fedinf_jax.diffusion import score, sde
from fedinf_jax.models import layers
from fedinf_jax.sampling import aggregators, solvers


def test_register_get_and_order():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    reg.register("a", len)
    assert reg.get("b") is b and reg.get("a") is len
    assert reg.names() == ("b", "a") and list(reg) == ["b", "a"] and len(reg) == 2
    assert "a" in reg and "c" not in reg
    assert reg.check("a") == "a"


def test_duplicate_name_is_refused():
    reg = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_replace_is_on_purpose_and_keeps_the_order():
    reg = Registry("widget").register_all({"a": 1, "b": 2})
    assert reg.register("a", 3, replace=True) == 3
    assert reg.get("a") == 3 and reg.names() == ("a", "b")
    reg.register("c", replace=True)(4)  # a name not yet there: registered as usual
    assert reg.names() == ("a", "b", "c")


def test_register_all_is_register_in_order():
    reg = Registry("widget").register_all({"b": 2, "a": 1})
    assert reg.names() == ("b", "a") and reg.get("a") == 1
    assert reg.register_all({"c": 3}) is reg and reg.names() == ("b", "a", "c")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register_all({"d": 4, "a": 5})
    assert reg.get("a") == 1 and "d" not in reg  # all or nothing


def test_unknown_name_lists_the_valid_ones():
    reg = Registry("widget")
    reg.register("x", 1)
    reg.register("y", 2)
    with pytest.raises(ValueError, match=r"unknown widget 'z'; valid: \['x', 'y'\]"):
        reg.get("z")
    with pytest.raises(ValueError, match=r"unknown mode 'q'; valid: \['p'\]"):
        check_choice("mode", "q", ("p",))


@pytest.mark.parametrize(
    "family",
    [
        aggregators.AGGREGATORS,
        solvers.ODE_SOLVERS,
        solvers.SDE_SOLVERS,
        solvers.SCHEDULES,
        sde.SDES,
        partitions.PARTITIONS,
        agent_axis.STRATEGIES,
        layers.CONV_IMPLS,
        score.TRAINING_NOISE,
    ],
    ids=lambda r: r.family,
)
def test_every_plug_in_family_is_a_registry(family):
    assert isinstance(family, Registry) and len(family) >= 2
    with pytest.raises(ValueError, match=f"unknown {family.family} 'nope'; valid: "):
        family.get("nope")


def test_settings_build_and_parse_read_a_members_signature():
    """A member's parameters are its settings, but the family's context, which comes from the
    run: ``build`` takes the section's fields that are settings and the context it is given,
    and names a needed context parameter that is missing; ``parse`` reads ``name:key=value``."""
    reg = Registry("widget", context={"labels": "the labels"})

    @reg.register("scaled")
    def scaled(labels, factor: float = 2.0, name: str = "x"):
        return [factor * v for v in labels], name

    @reg.register("plain")
    def plain(size: int = 3):
        return size

    assert reg.settings("scaled") == {"factor": 2.0, "name": "x"}
    section = {"factor": 3.0, "size": 7, "other": 1}  # fields of other members are left alone
    assert reg.build("scaled", section, labels=[1, 2]) == ([3.0, 6.0], "x")
    assert reg.build("plain", section, labels=[1, 2]) == 7
    assert reg.build("plain") == 3
    with pytest.raises(ValueError, match="widget 'scaled' needs the labels"):
        reg.build("scaled", section)
    assert reg.parse("scaled:factor=0.5,name=y") == ("scaled", {"factor": 0.5, "name": "y"})
    assert reg.parse("plain") == ("plain", {})
    with pytest.raises(ValueError, match=r"unknown setting of scaled 'labels'; valid: \['factor'"):
        reg.parse("scaled:labels=1")
    with pytest.raises(ValueError, match="unknown widget 'nope'"):
        reg.parse("nope:size=1")
