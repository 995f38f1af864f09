/* Sub-commands of the dpoc CLI, one file each. argc/argv are the arguments after
 * the sub-command's name; pargc/pargv are main's, for MPI_Init. Each returns
 * the process exit code. */
#ifndef DPOC_CLI_COMMANDS_H
#define DPOC_CLI_COMMANDS_H

int dpoc_cli_bench_comm(int argc, char **argv, int *pargc, char ***pargv);
int dpoc_cli_tokenize(int argc, char **argv);
int dpoc_cli_data_check(int argc, char **argv);
int dpoc_cli_export(int argc, char **argv);
int dpoc_cli_generate(int argc, char **argv);
int dpoc_cli_build_pairs(int argc, char **argv);
int dpoc_cli_perplexity(int argc, char **argv);
int dpoc_cli_bench(int argc, char **argv, int *pargc, char ***pargv);
int dpoc_cli_doctor(int argc, char **argv);

#endif
