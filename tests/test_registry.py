import pytest

import mtl_keras


def test_list_models_has_the_paper_models_and_filters_by_pattern():
    names = mtl_keras.list_models()
    assert "kendall_deeplabv3_resnet101" in names and "kendall_deeplabv3_resnet50" in names
    assert names == sorted(names)
    assert mtl_keras.list_models("*resnet101*") == ["kendall_deeplabv3_resnet101"]
    assert mtl_keras.list_models("no_such_*") == []


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="kendall_deeplabv3_resnet101"):
        mtl_keras.build_model("resnet9000")


def test_unknown_or_empty_task_lists_valid_tasks():
    with pytest.raises(ValueError, match="semantic, instance, depth, normals"):
        mtl_keras.build_model("kendall_deeplabv3_resnet50", tasks=("semantic", "edges"))
    with pytest.raises(ValueError, match="At least one task"):
        mtl_keras.build_model("kendall_deeplabv3_resnet50", tasks=())


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        mtl_keras.register_model(lambda **kw: None, name="kendall_deeplabv3_resnet50")
