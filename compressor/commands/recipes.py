"""`compress recipes`: list the built-in recipes with their one-line descriptions."""

from __future__ import annotations

from compressor.commands.args import Parser


def run(argv: list[str]) -> int:
    parser = Parser(prog="compress recipes", description="List the built-in recipes.")
    parser.parse_args(argv)
    import yaml

    from compressor.errors import RecipeError
    from compressor.recipe import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        try:
            description = load_recipe(str(path)).description
        except RecipeError as err:  # one that needs an extra not installed here (nf4: bitsandbytes) is still listed
            description = f"{yaml.safe_load(path.read_text())['description']} [unusable here: {err.message}]"
        print(f"{name:<22} {description}")
    return 0
