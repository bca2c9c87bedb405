"""The commands as Python functions, built from the registry: the same names, flags and defaults
as the command line (`featopt search gcg --tokens 8` is `featopt.search.gcg(tokens=8)`), plus
`adapter=` to run on a model already loaded, and objectives given as values.

    import featopt
    from featopt.objectives import l1_target, maximize
    run = featopt.search.gcg(l1_target("[:, :, 3]", 100, "blocks.0.resid_post") - 0.5 * maximize("[:, :, 7]", "blocks.0.resid_post"),
                             model="smollm2-135m-instruct", tokens=8)
    run            # in Jupyter: the results table (and the run's PNGs); print(run) in a terminal
    run.results    # one FeatureResult per problem
"""

from __future__ import annotations

import inspect
from dataclasses import fields

from featopt.commands.fields import check_config, default_of, field_docs
from featopt.commands.registry import BY_NAME


def function(name: str):
    """The command `name` ("search gcg") as a function: keyword arguments are its config's fields
    (those in `Command.positional` may come first, positionally), `adapter=` a loaded model."""
    command = BY_NAME[name]
    config_cls = command.config
    names = [f.name for f in fields(config_cls)]

    def call(*args, adapter=None, **kwargs):
        if len(args) > len(command.positional):
            raise TypeError(f"featopt {name} takes at most {len(command.positional)} positional argument(s) "
                            f"({', '.join(command.positional) or 'none'}), got {len(args)}")
        kwargs.update(zip(command.positional, args))
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"featopt {name} has no setting {unknown[0]!r}; its settings are: {', '.join(names)}")
        config = config_cls(**kwargs)
        check_config(config)
        return command.run(config, adapter) if "adapter" in inspect.signature(command.run).parameters else command.run(config)

    docs = field_docs(config_cls)
    params = []
    for f in fields(config_cls):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name in command.positional else inspect.Parameter.KEYWORD_ONLY
        params.append((f.name, kind, default_of(f)))
    params.sort(key=lambda p: (p[1] != inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               command.positional.index(p[0]) if p[0] in command.positional else 0))
    signature = [inspect.Parameter(n, k, default=d) for n, k, d in params]
    signature.append(inspect.Parameter("adapter", inspect.Parameter.KEYWORD_ONLY, default=None))
    call.__signature__ = inspect.Signature(signature)
    call.__name__ = call.__qualname__ = command.leaf
    call.__doc__ = (f"`featopt {name}`: {command.summary}\n\nArgs:\n"
                    + "\n".join(f"    {f.name}: {docs.get(f.name, '')}" for f in fields(config_cls))
                    + "\n    adapter: a loaded model (featopt.models.load_model) to run on instead of loading --model"
                    + f"\n\nReturns the run's result object (its table prints as `featopt {name}` prints it).")
    return call
