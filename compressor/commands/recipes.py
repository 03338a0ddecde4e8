"""`compress recipes`: list the built-in recipes with their one-line descriptions."""

from __future__ import annotations

from compressor.commands.args import Parser


def run(argv: list[str]) -> int:
    parser = Parser(prog="compress recipes", description="List the built-in recipes.")
    parser.parse_args(argv)
    from compressor.recipe import builtin_recipes, load_recipe

    for name, path in builtin_recipes().items():
        recipe = load_recipe(str(path))
        print(f"{name:<22} {recipe.description}")
    return 0
