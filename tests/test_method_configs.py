"""The method configs refuse bad fields when they are built, naming the class
and the field, instead of failing late in a run or silently meaning
something else; valid configs keep their normalised values."""
import pytest

from vlmkern import QuantConfig
from vlmkern.calib.awq_engine import AWQEngineConfig
from vlmkern.calib.luq import LUQConfig
from vlmkern.calib.qvlm import QVLMConfig
from vlmkern.calib.qvlm_vision import VisionOptConfig
from vlmkern.config import BinaryConfig, IntActConfig
from vlmkern.quant.awq import AWQConfig
from vlmkern.quant.billm import BiLLMConfig
from vlmkern.quant.gptq import GPTAQConfig, GPTQConfig
from vlmkern.quant.vlmq import VLMQConfig

# --- names: a lone string is one name, and names are strings -----------------


def test_a_lone_clip_skip_string_is_one_name():
    assert AWQEngineConfig(clip_skip="q_proj").clip_skip == ("q_proj",)
    assert AWQEngineConfig(clip_skip=["q_proj", "k_proj"]).clip_skip == ("q_proj", "k_proj")
    assert AWQEngineConfig(clip_skip=()).clip_skip == ()
    assert AWQEngineConfig().clip_skip == ("q_proj", "k_proj")


@pytest.mark.parametrize("value", [(1, 2), ("q_proj", None), None, 3])
def test_clip_skip_names_must_be_strings(value):
    with pytest.raises(TypeError, match=r"AWQEngineConfig\.clip_skip"):
        AWQEngineConfig(clip_skip=value)


def test_a_lone_weighted_string_is_one_name():
    assert VLMQConfig(weighted="self_attn.q_proj").weighted == ("self_attn.q_proj",)
    assert VLMQConfig(weighted=["self_attn.q_proj"]).weighted == ("self_attn.q_proj",)


@pytest.mark.parametrize("value", [(1,), ("self_attn.q_proj", 2), None])
def test_weighted_names_must_be_strings(value):
    with pytest.raises(TypeError, match=r"VLMQConfig\.weighted"):
        VLMQConfig(weighted=value)


def test_weighted_still_needs_a_nonempty_name():
    for value in [(), ("",), ""]:
        with pytest.raises(ValueError, match="weighted"):
            VLMQConfig(weighted=value)


# --- flags must be real bools --------------------------------------------------

@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_token_candidate_must_be_a_bool(value):
    with pytest.raises(TypeError, match=r"QVLMConfig\.token_candidate"):
        QVLMConfig(token_candidate=value)


# --- LUQ's two methods ----------------------------------------------------------

@pytest.mark.parametrize("field", ["high", "low"])
@pytest.mark.parametrize("value", [None, "billm", 4, AWQConfig()])
def test_luq_methods_must_be_layer_method_configs(field, value):
    with pytest.raises(TypeError, match=rf"LUQConfig\.{field}"):
        LUQConfig(**{field: value})


def test_luq_methods_take_every_layer_method_config():
    for cfg in [QuantConfig(4, 64), IntActConfig(8, 8), BinaryConfig(), GPTQConfig(),
                GPTAQConfig(), BiLLMConfig(), VLMQConfig()]:
        assert LUQConfig(high=cfg).high is cfg
        assert LUQConfig(low=cfg).low is cfg


@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("grid", ["abc", (4, 8), (8, 4, 16), (1, 4, 8), (4, 8.0, 16), 5])
def test_luq_k_grid_is_checked_whether_or_not_k_is_set(k, grid):
    with pytest.raises(ValueError, match=r"LUQConfig\.k_grid"):
        LUQConfig(k=k, k_grid=grid)


def test_luq_k_grid_keeps_a_valid_list_as_a_tuple():
    assert LUQConfig(k=4, k_grid=[2, 4, 8]).k_grid == (2, 4, 8)


@pytest.mark.parametrize("value", [0, 1])
def test_vision_entropy_needs_two_elements(value):
    with pytest.raises(ValueError, match=r"VisionOptConfig\.entropy_elements must be an int >= 2"):
        VisionOptConfig(entropy_elements=value)
    assert VisionOptConfig(entropy_elements=2).entropy_elements == 2


# --- seeds -----------------------------------------------------------------------

@pytest.mark.parametrize("cls", [LUQConfig, QVLMConfig, VisionOptConfig])
@pytest.mark.parametrize("value", ["x", 1.5, 1.0, True, None, -1])
def test_seed_must_be_an_int_at_least_zero(cls, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.seed"):
        cls(seed=value)


@pytest.mark.parametrize("cls", [LUQConfig, QVLMConfig, VisionOptConfig])
def test_valid_seeds(cls):
    assert cls().seed == 0
    assert cls(seed=12345).seed == 12345


# --- integer fields: real ints, not bools or floats ---------------------------------

@pytest.mark.parametrize("cls, field, value", [
    (AWQConfig, "n_grid", True),
    (AWQConfig, "clip_steps", True),
    (QVLMConfig, "max_depth", True),
    (QVLMConfig, "search_samples", True),
    (LUQConfig, "max_tokens", True),
    (LUQConfig, "kmeans_iters", True),
    (VisionOptConfig, "jacobian_samples", True),
    (VisionOptConfig, "entropy_elements", True),
    (VisionOptConfig, "w_bits", 8.0),
    (VisionOptConfig, "a_bits", 4.0),
    (VisionOptConfig, "w_bits", "8"),
])
def test_int_fields_refuse_bools_and_floats(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value})


# --- float fields: bools are no numbers, and errors name the field --------------------

FLOAT_FIELDS = [
    (GPTQConfig, "damp"), (GPTAQConfig, "alpha"), (BiLLMConfig, "damp"),
    (AWQConfig, "min_clip"), (QVLMConfig, "h0"),
    (VisionOptConfig, "lr"), (VisionOptConfig, "lambda_ent"),
    (VisionOptConfig, "lambda_err"), (VisionOptConfig, "eta"),
]


@pytest.mark.parametrize("cls, field, value", [
    (cls, field, value) for cls, field in FLOAT_FIELDS for value in [True, False, None, [1]]
    if (field, value) != ("h0", None)           # h0=None: the mean dependency
])
def test_float_fields_refuse_non_numbers(cls, field, value):
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value})


@pytest.mark.parametrize("cls, field", [
    (GPTQConfig, "damp"), (GPTAQConfig, "alpha"), (BiLLMConfig, "damp"),
    (AWQConfig, "min_clip"), (QVLMConfig, "h0"),
])
def test_float_fields_name_themselves_for_a_bad_string(cls, field):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: "abc"})


def test_float_fields_keep_their_normalisation():
    assert GPTQConfig(damp=0).damp == 0.0 and isinstance(GPTQConfig(damp=0).damp, float)
    assert GPTQConfig(damp="0.1").damp == 0.1
    assert GPTAQConfig(alpha=1).alpha == 1.0 and isinstance(GPTAQConfig(alpha=1).alpha, float)
    assert BiLLMConfig(damp=1).damp == 1.0
    assert AWQConfig(min_clip=0.25).min_clip == 0.25
    assert QVLMConfig(h0=0.5).h0 == 0.5
    assert VisionOptConfig(lr=0, eta=2).lr == 0


@pytest.mark.parametrize("value", [0.99, "0.9", None, 1])
def test_percentiles_must_be_a_sequence(value):
    with pytest.raises(TypeError, match=r"QVLMConfig\.percentiles"):
        QVLMConfig(percentiles=value)


@pytest.mark.parametrize("value", [(True,), (0.99, None), (0.99, [1])])
def test_percentiles_must_be_numbers(value):
    with pytest.raises(TypeError, match=r"QVLMConfig\.percentiles"):
        QVLMConfig(percentiles=value)


def test_percentiles_name_the_field_for_a_bad_string():
    with pytest.raises(ValueError, match=r"QVLMConfig\.percentiles"):
        QVLMConfig(percentiles=(0.99, "abc"))


def test_percentiles_keep_their_normalisation():
    assert QVLMConfig(percentiles=[1, 0.99]).percentiles == (1.0, 0.99)
    assert QVLMConfig(percentiles=()).percentiles == ()
    assert QVLMConfig().percentiles == (1.0, 0.995, 0.99, 0.985, 0.98)


# --- defaults are unchanged ------------------------------------------------------------

def test_defaults_still_build():
    for cls in [GPTQConfig, GPTAQConfig, BiLLMConfig, AWQConfig, AWQEngineConfig, VLMQConfig,
                LUQConfig, QVLMConfig, VisionOptConfig]:
        assert cls() == cls()
