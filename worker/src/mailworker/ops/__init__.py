"""Operations helpers behind the `mailworker` ops commands: broker keys, queues, results, workers.

Nothing here prints or exits; the click commands in mailworker.cli render what these return.
"""
