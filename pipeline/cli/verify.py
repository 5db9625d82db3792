"""``pipeline verify``: check a label folder against its markers and labels.json."""

from __future__ import annotations

import click

from pipeline.cli.options import must_exist, path_or_url


@click.command("verify")
@click.argument("labels_dir", type=click.Path(path_type=str), callback=path_or_url)
@click.option("--deep", is_flag=True, help="Also decode every image and label (reads every sample).")
def verify_cmd(labels_dir, deep):
    """Check a label folder (the one holding labels.json, or its URL: s3://…): every tar against its marker's sha256 and key
    list, labels.json against the markers, and with --deep that every image and label decodes.

    Prints what is wrong (shard, problem) and exits 1, or one OK line.
    """
    from pipeline.common.errors import error_message
    from pipeline.label.verify import verify_labels

    must_exist("labels_dir", urls=True)
    try:
        report = verify_labels(labels_dir, deep=deep)
    except Exception as e:  # noqa: BLE001 - one "Error: <sentence>" line, never a traceback
        raise click.ClickException(error_message(e)) from None
    if not report.ok:
        click.echo(report.table())
        shards = len({shard for shard, _ in report.problems})
        raise click.ClickException(f"{len(report.problems)} problem{'s' * (len(report.problems) != 1)} in "
                                   f"{shards} place{'s' * (shards != 1)} of {labels_dir}")
    click.echo(report.summary())
