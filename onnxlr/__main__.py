from onnxlr.cli import main

main()
