"""Registries: decorators, building, listing, presets, errors, plugins."""

from __future__ import annotations

import sys
import textwrap
import warnings
from dataclasses import dataclass

import pytest
import torch

import tokenprune as tp
from tokenprune.registry import Registry, load_plugins


@pytest.fixture
def registry() -> Registry:
    return Registry("selector", tp.Selector)


def make_selector(name: str, registry: Registry):
    @registry.register(name)
    @dataclass(frozen=True)
    class Keep(tp.Selector):
        """Keeps the first tokens."""

        layer: int = 0
        scale: float = 1.0

        def select(self, layout, signals, budgets):
            return tp.Selection(tuple(torch.arange(int(b)) for b in budgets))

    return Keep


def test_register_build_and_list(registry):
    cls = make_selector("keep_first", registry)
    make_selector("keep_last", registry)
    built = registry.build("keep_first", layer=3)
    assert isinstance(built, cls) and built.layer == 3 and cls.registry_name == "keep_first"
    assert registry.build({"name": "keep_first", "layer": 2}).layer == 2
    assert registry.list() == ["keep_first", "keep_last"]
    assert registry.list("*last") == ["keep_last"]
    assert registry.list("nothing*") == []
    assert registry.summary("keep_first") == "Keeps the first tokens."
    assert registry.name_of(built) == "keep_first"


def test_unknown_name_suggests_close_matches_and_lists_all(registry):
    make_selector("cls_final_test", registry)
    with pytest.raises(tp.UnknownNameError) as info:
        registry.build("cls_finl_test")
    message = str(info.value)
    assert "Did you mean 'cls_final_test'" in message and "Available selectors: cls_final_test" in message
    assert isinstance(info.value, LookupError)


def test_duplicate_names_the_module_of_the_first_registration(registry):
    make_selector("twice", registry)
    with pytest.raises(tp.DuplicateNameError, match=r"already registered by tests\.test_registry \(line \d+\)"):
        make_selector("twice", registry)


def test_bad_names_and_non_strategies_are_rejected(registry):
    with pytest.raises(tp.ConfigError, match="snake_case"):
        registry.register("Bad-Name")
    with pytest.raises(tp.ConfigError, match="must subclass tokenprune.Selector"):
        registry.register("not_a_selector")(dict)


def test_unknown_option_suggests_and_lists_options(registry):
    make_selector("opts", registry)
    with pytest.raises(tp.ConfigError, match=r"no option 'layr'. Did you mean 'layer'\? Its options: layer, scale"):
        registry.build("opts", layr=1)


def test_option_types_are_checked_and_normalised(registry):
    make_selector("typed", registry)
    with pytest.raises(tp.ConfigError, match=r"option layer='3' must be int"):
        registry.build("typed", layer="3")
    with pytest.raises(tp.ConfigError, match=r"option layer=True must be int"):
        registry.build("typed", layer=True)
    with pytest.raises(tp.ConfigError, match="must be finite"):
        registry.build("typed", scale=float("nan"))
    built = registry.build("typed", scale=2)
    assert built.scale == 2.0 and isinstance(built.scale, float)


def test_check_hook_runs_after_type_checks():
    with pytest.raises(tp.ConfigError, match="layer 99 is reserved"):
        tp.build_selector("example_topk", layer=99)


def test_presets_resolve_list_and_accept_overrides(registry):
    make_selector("base", registry)
    registry.register_preset("base@paper", {"layer": 7}, doc="Paper setting.\n\nlayer 7.")
    assert registry.build("base@paper").layer == 7
    assert registry.build("base@paper", layer=5).layer == 5
    assert registry.list("base*") == ["base", "base@paper"]
    assert registry.summary("base@paper") == "Paper setting."
    with pytest.raises(tp.UnknownNameError, match="Did you mean 'base@paper'"):
        registry.build("base@papr")
    with pytest.raises(tp.ConfigError, match="base@variant"):
        registry.register_preset("nobase", {}, doc="x")
    with pytest.raises(tp.ConfigError, match="needs a doc"):
        registry.register_preset("base@nodoc", {}, doc="  ")


def test_preset_options_are_validated_at_build(registry):
    make_selector("strict", registry)
    registry.register_preset("strict@broken", {"layr": 1}, doc="Broken on purpose.")
    with pytest.raises(tp.ConfigError, match="no option 'layr'"):
        registry.build("strict@broken")


def test_public_functions_and_presets_in_global_registries():
    assert "example_topk" in tp.list_selectors()
    assert "example_attention_mass@floor" in tp.list_allocators("example_*")
    assert tp.build_allocator("example_attention_mass@floor").rounding == "floor"
    assert tp.list_selectors("example_*") == sorted(tp.list_selectors("example_*"))


def test_strategy_in_a_separate_module_is_found_by_name(tmp_path, monkeypatch):
    module = tmp_path / "my_lab_strategies.py"
    module.write_text(
        textwrap.dedent(
            '''
            from dataclasses import dataclass
            import torch
            import tokenprune as tp

            @tp.register_selector("lab_first_tokens")
            @dataclass(frozen=True)
            class LabFirstTokens(tp.Selector):
                """Keeps the first valid tokens."""

                def select(self, layout, signals, budgets):
                    return tp.Selection(tuple(
                        torch.nonzero(v).flatten()[: int(b)] for v, b in zip(layout.valid, budgets)
                    ))
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import my_lab_strategies  # noqa: F401

        selector = tp.build_selector("lab_first_tokens")
        layout = tp.Layout.single(2)
        result = tp.Pipeline(allocator="example_attention_mass", selector=selector, budget=3).apply(
            layout, tp.Signals(cls_attention={0: torch.rand(1, 1, 4)}, num_layers=1)
        )
        assert result.selection.indices[0].tolist() == [0, 1, 2]
    finally:
        tp.SELECTORS.unregister("lab_first_tokens")
        sys.modules.pop("my_lab_strategies", None)


def _install_fake_distribution(site, name: str, module_name: str, body: str, entry: str) -> None:
    dist_info = site / f"{name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[tokenprune.plugins]\n{name} = {entry}\n")
    (site / f"{module_name}.py").write_text(textwrap.dedent(body))


def test_entry_point_plugin_of_a_separately_installed_distribution(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    _install_fake_distribution(
        site,
        "tokenprune_lab_plugin",
        "tokenprune_lab_plugin",
        '''
        from dataclasses import dataclass
        import tokenprune as tp

        @tp.register_allocator("lab_everything_to_first")
        @dataclass(frozen=True)
        class EverythingToFirst(tp.BudgetAllocator):
            """Gives the first partition all it can hold."""

            def allocate(self, layout, signals, total):
                weights = [1.0] + [0.0] * (layout.num_partitions - 1)
                return tp.apportion(weights, total, layout.capacity)
        ''',
        "tokenprune_lab_plugin",
    )
    _install_fake_distribution(
        site,
        "tokenprune_broken_plugin",
        "tokenprune_broken_plugin",
        "raise ImportError('this plugin is broken on purpose')\n",
        "tokenprune_broken_plugin",
    )
    monkeypatch.syspath_prepend(str(site))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_plugins(reload=True)
        assert any("tokenprune_broken_plugin" in str(w.message) and "broken on purpose" in str(w.message) for w in caught)
        assert "lab_everything_to_first" in tp.list_allocators("lab_*")
        allocator = tp.build_allocator("lab_everything_to_first")
        layout = tp.Layout(2, (1, 2), False, torch.ones(2, 4, dtype=torch.bool))
        assert allocator.allocate(layout, tp.Signals(), 6).tolist() == [4, 2]
    finally:
        tp.ALLOCATORS.unregister("lab_everything_to_first")
        sys.modules.pop("tokenprune_lab_plugin", None)
        sys.modules.pop("tokenprune_broken_plugin", None)


def test_name_of_an_unregistered_instance_is_a_clear_error():
    @dataclass(frozen=True)
    class Loose(tp.Selector):
        def select(self, layout, signals, budgets):
            raise NotImplementedError

    with pytest.raises(tp.UnknownNameError, match="register it with tokenprune.register_selector"):
        tp.SELECTORS.name_of(Loose())


def test_preset_on_an_unregistered_base_names_its_origin(registry):
    registry.register_preset("ghost@x", {}, doc="Nothing underneath.")
    with pytest.raises(tp.UnknownNameError, match=r"preset 'ghost@x' \(registered by tests\.test_registry \(line \d+\)\) is based on 'ghost'"):
        registry.build("ghost@x")


def test_a_failing_builtin_import_is_retried_not_left_half_loaded():
    broken = Registry("selector", tp.Selector, ("tokenprune.no_such_module",))
    with pytest.raises(ModuleNotFoundError):
        broken.names()
    assert broken._builtins_loaded is False
    with pytest.raises(ModuleNotFoundError):  # retried, not silently empty
        broken.names()


def test_a_plugin_raising_system_exit_is_reported_and_list_goes_on(tmp_path, monkeypatch, capsys):
    import tokenprune.registry as registry_module
    from tokenprune.cli import main

    site = tmp_path / "site-packages"
    site.mkdir()
    _install_fake_distribution(
        site, "tokenprune_exiting_plugin", "tokenprune_exiting_plugin", "raise SystemExit('plugin quits')\n",
        "tokenprune_exiting_plugin",
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry_module, "_plugins_loaded", False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["list"]) == 0
        out = capsys.readouterr().out
        assert "adapters (" in out and "allocators (" in out and "selectors (" in out
        assert any(
            "tokenprune_exiting_plugin" in str(w.message) and "SystemExit: plugin quits" in str(w.message)
            for w in caught
        )
    finally:
        sys.modules.pop("tokenprune_exiting_plugin", None)
