# Tests beside the doctest binary: the study report's Python self-test (Debian's python3 with
# matplotlib and numpy, which tools/setup.sh installs); left out where they are missing.
execute_process(COMMAND /usr/bin/python3 -c "import matplotlib, numpy" RESULT_VARIABLE _deeplora_py OUTPUT_QUIET ERROR_QUIET)
if(_deeplora_py EQUAL 0)
  add_test(NAME study_report COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/tools/test_study_report.py)
else()
  message(STATUS "deeplora: /usr/bin/python3 with matplotlib + numpy not found: the study report's self-test is left out")
endif()

# House rules (tools/check_layers.py): no include from a lower layer to a higher one, no source file
# over 600 lines, beyond the debt listed in the script.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  add_test(NAME house_rules COMMAND ${Python3_EXECUTABLE} ${CMAKE_CURRENT_SOURCE_DIR}/tools/check_layers.py)
endif()
