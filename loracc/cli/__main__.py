from loracc.cli import main

main(prog_name="loracc")
