#pragma once
// The q35jit subcommands. Each takes the whole argv (flags start at argv[2]) and returns the
// process exit code; failures throw q35::Error.
namespace q35::cli {

int cmd_run(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_compile(int argc, char** argv);
int cmd_quantize(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_tune(int argc, char** argv);
int cmd_serve(int argc, char** argv);

}  // namespace q35::cli
