from inspect_vmemmap.cli import main

main()
