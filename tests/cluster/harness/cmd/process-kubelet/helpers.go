package main

import "os"

func lookupHostEnv(name string) (string, bool) { return os.LookupEnv(name) }
